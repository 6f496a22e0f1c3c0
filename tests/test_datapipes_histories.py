"""The per-user history store: windows against a per-row reference, end offsets, the gather transform (order kept,
repeated users gathered once), and damaged or foreign stores refused with one line naming the file."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from common.errors import DataError
from datapipes.batch import SampleBatch
from datapipes.histories import HistoryGather, HistoryStore, HistoryWriter
from datapipes.prepared import PreparedDataset
from datapipes.reader import make_dataloader


def _store(tmp_path, lengths, seed=0, num_items=1000):
    """A store of len(lengths) users (indices 1..n) with random histories; returns (store, per-user lists)."""
    rng = np.random.default_rng(seed)
    n = len(lengths)
    writer = HistoryWriter(str(tmp_path / "store"), n, num_items, 50, "fp", "train")
    histories = {}
    order = rng.permutation(np.arange(1, n + 1))  # users written in any order
    for chunk in np.array_split(order, 3):
        lens = np.array([lengths[u - 1] for u in chunk], dtype=np.int64)
        items = rng.integers(0, num_items, lens.sum()).astype(np.int32)
        cats = rng.integers(1, 50, lens.sum()).astype(np.int32)
        starts = np.concatenate([[0], np.cumsum(lens)])
        for j, u in enumerate(chunk):
            histories[int(u)] = (items[starts[j]:starts[j + 1]], cats[starts[j]:starts[j + 1]])
        writer.add(chunk.astype(np.int64), lens, items, cats, np.tile(chunk[:, None], (1, 5)))
    writer.close()
    return HistoryStore.open(str(tmp_path / "store"), fingerprint="fp", num_users=n), histories


@pytest.mark.parametrize("mean_len", [3, 200])  # element-wise and per-row copy paths
def test_windows_hold_the_newest_visible_entries_right_aligned(tmp_path, mean_len):
    rng = np.random.default_rng(mean_len)
    lengths = rng.integers(0, 2 * mean_len, 40).tolist()
    store, histories = _store(tmp_path, lengths, num_items=100_000)
    assert store.items.dtype == np.int32 and store.cats.dtype == np.int16  # narrowest id type of each vocabulary
    users = rng.integers(0, 41, 60)  # user 0: no history
    ends = np.where(rng.random(60) < 0.5, -1, rng.integers(0, 2 * mean_len, 60))
    for length in (1, mean_len, 3 * mean_len):
        items, cats = store.window(users, length, ends)
        assert items.shape == cats.shape == (60, length) and items.dtype == np.int64
        for i, (u, e) in enumerate(zip(users.tolist(), ends.tolist())):
            want_i, want_c = histories.get(u, (np.zeros(0, np.int32),) * 2)
            if e >= 0:
                want_i, want_c = want_i[:e], want_c[:e]
            tail = want_i[-length:] if length else want_i[:0]
            np.testing.assert_array_equal(items[i], np.concatenate([np.zeros(length - tail.size, np.int64), tail]))
            tail = want_c[-length:]
            np.testing.assert_array_equal(cats[i], np.concatenate([np.zeros(length - tail.size, np.int64), tail]))


def _samples(users, ends):
    b = len(users)
    zeros = torch.zeros(b, dtype=torch.int64)
    return SampleBatch(labels=torch.zeros(b), user_id=torch.tensor(users), profile=torch.zeros(b, 5, dtype=torch.int64),
                       target_item=zeros, target_cat=zeros, item_city=zeros, item_province=zeros,
                       history_end=torch.tensor(ends), sample_index=torch.arange(b))


def test_gather_keeps_sample_order_and_gathers_repeated_users_once(tmp_path, monkeypatch):
    store, _ = _store(tmp_path, [5, 9, 0, 30, 7, 12])
    gather = HistoryGather(store)
    calls = []
    original = HistoryStore.window
    monkeypatch.setattr(HistoryStore, "window", lambda self, u, n, e=None: calls.append(len(u)) or original(self, u, n, e))
    for users, ends in (([6, 4, 1, 2], [-1, -1, -1, -1]), ([4, 1, 4, 4, 6, 1], [-1, 3, -1, 10, -1, 3])):
        raw = gather(_samples(users, ends))
        items, _ = original(store, np.array(users), raw.history_items.shape[1], np.array(ends))
        np.testing.assert_array_equal(raw.history_items.numpy(), items)
        assert raw.history_items.shape[1] == 30  # the longest visible history of the batch
    assert calls == [4, 4]  # the second batch: 4 distinct (user, end) pairs for 6 samples
    capped = HistoryGather(store, max_seq_len=8, window_len=6)(_samples([4, 2], [-1, -1]))
    assert capped.history_items.shape == (2, 6)
    empty = HistoryGather(store)(_samples([3], [-1]))
    assert empty.history_items.shape == (1, 1) and not empty.history_items.any()


def test_history_end_limits_what_a_sample_sees(prepared_dataset, tmp_path):
    """A sample's history_end (datasets with timestamps) hides its user's later behaviors, through the reader."""
    root = tmp_path / "ds"
    shutil.copytree(prepared_dataset, root)
    ds = PreparedDataset.open(str(root))
    path = ds.shards("test")[0]
    table = pq.read_table(path)
    ends = np.arange(table.num_rows, dtype=np.int64) % 7 - 1  # -1 (all) and 0..5
    pq.write_table(table.set_column(table.schema.get_field_index("history_end"), "history_end", pa.array(ends)), path)
    store = ds.histories("test")
    first = make_dataloader(str(root), "test", 0, 1, 64, shuffle=False)
    samples = next(iter(first))
    raw = HistoryGather(store)(samples)
    visible = ((raw.history_items != 0) | (raw.history_cats != 0)).sum(1).numpy()
    full = np.diff(store.offsets[samples.user_id.numpy()], axis=1)[:, 0]
    e = samples.history_end.numpy()
    np.testing.assert_array_equal(visible, np.where(e >= 0, np.minimum(full, e), full))
    assert (e >= 0).any() and (visible < full).any()


def _copy_store(prepared_dataset, tmp_path):
    src = os.path.join(prepared_dataset, "train", "histories")
    dst = tmp_path / "store"
    shutil.copytree(src, dst)
    return dst


def test_a_truncated_array_is_refused_naming_the_file(prepared_dataset, tmp_path):
    dst = _copy_store(prepared_dataset, tmp_path)
    data = (dst / "items.npy").read_bytes()
    (dst / "items.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"items\.npy: \(file\)"):
        HistoryStore.open(str(dst))


def test_a_store_of_another_vocabulary_or_size_is_refused(prepared_dataset, tmp_path):
    dst = _copy_store(prepared_dataset, tmp_path)
    with pytest.raises(DataError, match="store.json: vocab_fingerprint"):
        HistoryStore.open(str(dst), fingerprint="another")
    with pytest.raises(DataError, match="store.json: users"):
        HistoryStore.open(str(dst), num_users=3)
    meta = json.loads((dst / "store.json").read_text())
    (dst / "store.json").write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(DataError, match="store.json: format"):
        HistoryStore.open(str(dst))
    with pytest.raises(DataError, match="store.json: .*missing"):
        HistoryStore.open(str(tmp_path / "nowhere"))


def test_offsets_past_the_entries_are_refused(prepared_dataset, tmp_path):
    dst = _copy_store(prepared_dataset, tmp_path)
    offsets = np.load(dst / "offsets.npy")
    offsets[3, 1] = offsets.max() + 10
    np.save(dst / "offsets.npy", offsets)
    with pytest.raises(DataError, match="offsets.npy: .*outside"):
        HistoryStore.open(str(dst))


def test_a_dataset_of_the_per_sample_layout_is_refused_with_one_line(prepared_dataset, tmp_path):
    root = tmp_path / "old"
    shutil.copytree(prepared_dataset, root)
    meta = json.loads((root / "metadata.json").read_text())
    (root / "metadata.json").write_text(json.dumps({**meta, "schema_version": 1}))
    with pytest.raises(DataError, match="schema_version: 1 is not supported.*muse prepare"):
        PreparedDataset.open(str(root))
