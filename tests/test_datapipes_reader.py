"""The per-rank reader: sample batches, rank splitting, determinism, resume, transforms in workers."""

import collections
import os

import numpy as np
import pytest
import torch

from common.errors import UserError
from datapipes.batch import SampleBatch
from datapipes.prepared import PreparedDataset
from datapipes.reader import resume_point, make_dataloader, user_grouped_order


def _keys(batch):
    """One hashable identity per sample: (row in the split, user, target, label)."""
    return [(int(i), int(u), int(t), int(y))
            for i, u, t, y in zip(batch.sample_index, batch.user_id, batch.target_item, batch.labels)]


def _all_keys(loader):
    return [k for b in loader for k in _keys(b)]


class PidTag:
    """A picklable transform that records which process ran it."""

    def __call__(self, batch: SampleBatch):
        return os.getpid(), batch


def test_resume_point_follows_round_robin_and_skips_finished_workers():
    assert resume_point([3, 3], 3) == ([2, 1], 1)
    assert resume_point([1, 3, 2], 5) == ([1, 2, 2], 1)
    assert resume_point([2, 1], 3) == ([2, 1], 1)
    assert resume_point([2, 2], 0) == ([0, 0], 0)


def test_sample_batches_carry_the_stored_rows_and_the_users_profile(prepared_dataset):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds = PreparedDataset.open(prepared_dataset)
    rows = pa.concat_tables([pq.read_table(p) for p in ds.shards("train")])
    store = ds.histories("train")
    batch = next(iter(make_dataloader(prepared_dataset, "train", 0, 1, batch_size=32, seed=3)))
    assert isinstance(batch, SampleBatch) and batch.batch_size == 32
    assert batch.labels.dtype == torch.float32 and set(batch.labels.unique().tolist()) <= {0.0, 1.0}
    index = batch.sample_index.numpy()
    assert np.unique(index).size == 32
    for name, got in (("user", batch.user_id), ("target_item", batch.target_item), ("target_cat", batch.target_cat),
                      ("item_city", batch.item_city), ("item_province", batch.item_province),
                      ("history_end", batch.history_end)):
        np.testing.assert_array_equal(got.numpy(), rows.column(name).to_numpy()[index])
    np.testing.assert_array_equal(batch.labels.numpy(), rows.column("label").to_numpy()[index])
    assert batch.profile.shape == (32, 5) and batch.profile.dtype == torch.int64
    np.testing.assert_array_equal(batch.profile.numpy(), store.profile[batch.user_id.numpy()])
    assert (batch.history_end == -1).all()


@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_ranks_get_disjoint_equal_parts_of_the_split(prepared_dataset, world_size):
    everything = collections.Counter(_all_keys(make_dataloader(prepared_dataset, "train", 0, 1, 100, shuffle=False)))
    rows = sum(everything.values())
    seen = collections.Counter()
    lengths = set()
    for rank in range(world_size):
        loader = make_dataloader(prepared_dataset, "train", rank, world_size, batch_size=50, seed=1)
        keys = _all_keys(loader)
        assert len(keys) == rows // world_size
        lengths.add(len(loader))
        seen.update(keys)
    assert len(lengths) == 1  # every rank runs the same number of steps
    assert not seen - everything and sum(seen.values()) == world_size * (rows // world_size)
    kept = collections.Counter()
    for rank in range(world_size):
        kept.update(_all_keys(make_dataloader(prepared_dataset, "train", rank, world_size, 50, drop_remainder=False)))
    assert kept == everything


def test_world_size_larger_than_the_split_is_a_user_error(prepared_dataset):
    rows = PreparedDataset.open(prepared_dataset).metadata.splits["test"].rows
    with pytest.raises(UserError, match="--world-size"):
        make_dataloader(prepared_dataset, "test", 0, rows + 1, batch_size=4)


def test_order_is_deterministic_per_seed_and_changes_with_seed_and_epoch(prepared_dataset):
    def epoch_keys(seed, epochs=1):
        loader = make_dataloader(prepared_dataset, "train", 0, 1, batch_size=64, seed=seed)
        return [_all_keys(loader) for _ in range(epochs)]

    first, second = epoch_keys(5, epochs=2)
    assert epoch_keys(5) == [first]
    assert epoch_keys(6)[0] != first
    assert second != first and sorted(second) == sorted(first)


def test_drop_last_yields_only_full_batches(prepared_dataset):
    loader = make_dataloader(prepared_dataset, "test", 0, 1, batch_size=100, drop_last=True)
    sizes = [b.batch_size for b in loader]
    assert sizes and set(sizes) == {100} and len(sizes) == len(loader)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_state_dict_yields_exactly_the_remaining_batches(prepared_dataset, num_workers):
    def make():
        return make_dataloader(prepared_dataset, "train", 1, 2, batch_size=40, num_workers=num_workers, seed=11)

    reference = make()
    epoch0 = [_keys(b) for b in reference]
    epoch1 = [_keys(b) for b in reference]
    interrupted = make()
    it = iter(interrupted)
    head = [_keys(next(it)) for _ in range(5)]
    state = interrupted.state_dict()
    del it
    assert head == epoch0[:5] and state["epoch"] == 0 and state["batches_consumed"] == 5
    resumed = make()
    resumed.load_state_dict(state)
    assert [_keys(b) for b in resumed] == epoch0[5:]
    assert [_keys(b) for b in resumed] == epoch1


def test_resume_rejects_a_different_batch_size(prepared_dataset):
    state = make_dataloader(prepared_dataset, "train", 0, 1, batch_size=40).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        make_dataloader(prepared_dataset, "train", 0, 1, batch_size=41).load_state_dict(state)


def test_transform_runs_inside_the_worker_processes(prepared_dataset):
    loader = make_dataloader(prepared_dataset, "test", 0, 1, batch_size=64, transform=PidTag(), num_workers=2)
    out = list(loader)
    pids = {pid for pid, _ in out}
    assert os.getpid() not in pids and len(pids) == 2
    assert all(isinstance(b, SampleBatch) for _, b in out)
    assert sum(b.batch_size for _, b in out) == PreparedDataset.open(prepared_dataset).metadata.splits["test"].rows


@pytest.mark.parametrize("num_workers", [0, 2])
def test_endless_stream_continues_across_epochs_and_starts_the_next_epoch_early(prepared_dataset, num_workers):
    """endless() (the trainer's stream) yields exactly the epoch-by-epoch batches from a resumed position, and with
    workers it starts the next epoch's loader while the current one still has its queued batches to deliver."""
    def make():
        return make_dataloader(prepared_dataset, "train", 1, 2, batch_size=40, num_workers=num_workers, seed=11)

    reference = make()
    epochs = [[_keys(b) for b in reference] for _ in range(3)]
    per_epoch = len(epochs[0])
    stream = make()
    stream.load_state_dict({"epoch": 0, "batches_consumed": 5})
    started = []
    original = stream._epoch
    stream._epoch = lambda epoch, consumed: started.append((epoch, stream.epoch, stream.consumed)) or original(epoch, consumed)
    it = stream.endless()
    got = [_keys(next(it)) for _ in range(2 * per_epoch)]
    assert got == epochs[0][5:] + epochs[1] + epochs[2][:5]
    assert stream.state_dict()["epoch"] == 2 and stream.state_dict()["batches_consumed"] == 5
    lead = stream.prefetch_factor * num_workers
    if num_workers:  # epoch e + 1 was started while epoch e still had at least `lead` batches to deliver
        assert started[0] == (0, 0, 5) and [e for e, _, _ in started[:3]] == [0, 1, 2]
        assert all(at == e - 1 and consumed <= per_epoch - lead for e, at, consumed in started[1:])
    else:
        assert started == [(0, 0, 5), (1, 1, 0), (2, 2, 0)]


def test_user_grouped_order_keeps_each_users_rows_together_in_random_order():
    users = np.array([5, 3, 5, 9, 3, 5, 9, 1, 3, 5])
    order = user_grouped_order(users, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(users.size))
    runs = [users[order][0]] + [u for prev, u in zip(users[order], users[order][1:]) if u != prev]
    assert sorted(runs) == [1, 3, 5, 9]  # every user appears as one run
    again = user_grouped_order(users, np.random.default_rng(0))
    assert np.array_equal(order, again)  # deterministic per seed
    orders = {tuple(user_grouped_order(users, np.random.default_rng(seed)).tolist()) for seed in range(8)}
    assert len(orders) > 1  # and shuffled: other seeds, other orders


def test_group_users_batches_hold_each_users_samples_together(prepared_dataset):
    """group_users reorders each shuffle buffer only: same rows per epoch, each user's rows consecutive, so batches
    hold far fewer distinct users than shuffled ones."""
    def epoch(group_users):
        loader = make_dataloader(prepared_dataset, "train", 0, 1, batch_size=64, seed=5, group_users=group_users)
        return list(loader)

    grouped, shuffled = epoch(True), epoch(False)
    assert sorted(k for b in grouped for k in _keys(b)) == sorted(k for b in shuffled for k in _keys(b))
    stream = torch.cat([b.user_id for b in grouped]).tolist()
    runs = [stream[0]] + [u for prev, u in zip(stream, stream[1:]) if u != prev]
    assert len(runs) == len(set(stream))  # one run per user (the split fits one shuffle buffer here)
    distinct = lambda batches: sum(len(set(b.user_id.tolist())) for b in batches)
    assert distinct(grouped) < distinct(shuffled) / 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_several_shuffle_buffers_read_ahead_and_resume_across_them(prepared_dataset, monkeypatch, num_workers):
    """With shuffle buffers of 3 batches (the next one read in a background thread while the current is served),
    an epoch still yields every row once, and a resume lands exactly, across buffer boundaries."""
    import datapipes.reader as reader

    whole = sorted(_all_keys(make_dataloader(prepared_dataset, "train", 0, 1, batch_size=40, seed=2)))
    row_bytes = 8 * PreparedDataset.open(prepared_dataset).metadata.max_seq_len + 96
    monkeypatch.setattr(reader, "_BUFFER_BYTES", 3 * 40 * row_bytes)

    def make():
        return make_dataloader(prepared_dataset, "train", 0, 1, batch_size=40, seed=2, num_workers=num_workers)

    loader = make()
    assert loader.buffer_rows == 120 and len(loader) >= 7
    epoch = [_keys(b) for b in loader]
    assert sorted(k for keys in epoch for k in keys) == whole  # every row once, whatever the buffer size
    resumed = make()
    resumed.load_state_dict({"epoch": 0, "batches_consumed": 5})
    assert [_keys(b) for b in resumed] == epoch[5:]


@pytest.mark.parametrize("preset", ["muse", "sim_soft"])
@pytest.mark.parametrize("inline", [True, False])
def test_batches_cross_processes_unchanged_inline_or_in_shared_memory(prepared_dataset, monkeypatch, preset, inline):
    import datapipes.batch as batch_module
    from multiprocessing.reduction import ForkingPickler

    from datapipes.histories import Chain, HistoryGather
    from model.config import ModelConfig
    from model.gsu import GsuStage
    from model.gsu.table import MMTable

    ds = PreparedDataset.open(prepared_dataset)
    stage = Chain(HistoryGather(ds.histories("train")), GsuStage(ModelConfig.preset(preset, k=8), MMTable.load(ds.root)))
    batch = next(iter(make_dataloader(prepared_dataset, "train", 0, 1, 32, transform=stage, shuffle=False)))
    monkeypatch.setattr(batch_module, "INLINE_BATCH_BYTES", 1 << 30 if inline else 0)
    payload = bytes(ForkingPickler.dumps(batch))
    assert (b"_inline_batch" in payload) == inline
    copy = ForkingPickler.loads(payload)
    for kjt, other in ((batch.sparse_features, copy.sparse_features), (batch.sequence_features, copy.sequence_features)):
        assert kjt.keys() == other.keys() and kjt.length_per_key() == other.length_per_key()
        assert torch.equal(kjt.values(), other.values()) and torch.equal(kjt.lengths(), other.lengths())
        assert kjt.offset_per_key() == other.offset_per_key()
    for name in ("labels", "recent_scores", "gsu_scores", "history_scores"):
        a, b = getattr(batch, name), getattr(copy, name)
        assert (a is None) == (b is None) and (a is None or (torch.equal(a, b) and a.dtype == b.dtype))
    assert (batch.history_scores is None) == (preset == "muse")


_ORPHAN_SCRIPT = """
import os, sys, time
from datapipes.reader import make_dataloader

class Heavy:
    # A batch far larger than a pipe's buffer, as an inline Batch at long histories is.
    def __call__(self, batch):
        return os.getpid(), b"x" * (1 << 20)

loader = make_dataloader(sys.argv[1], "train", 0, 1, 8, transform=Heavy(), num_workers=1)
batches = iter(loader)
worker, _ = next(batches)
print(worker, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_data_worker_ends_when_its_trainer_is_killed(prepared_dataset):
    """A SIGKILLed rank must not leave its worker behind blocked on a full result pipe (it would hold the
    launcher's stdout open and keep torchrun's restart from ever finishing)."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN_SCRIPT, prepared_dataset], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        worker = int(proc.stdout.readline())
        time.sleep(0.5)  # the worker has its next batches buffered and the pipe full
        assert _alive(worker)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.1)
        alive = _alive(worker)
    finally:
        proc.kill()
        proc.stdout.close()
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the data worker outlived its killed trainer"
