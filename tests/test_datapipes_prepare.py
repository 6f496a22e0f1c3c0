"""prepare: join statistics (drop vs pad), item coverage (out-of-vocabulary entries keep their position), truncation,
bucket-count independence, counting."""

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from datapipes import schema as S
from datapipes.counting import IdCounter
from datapipes.histories import HistoryGather
from datapipes.prepare import PrepareConfig, prepare
from datapipes.prepared import PreparedDataset
from datapipes.reader import make_dataloader
from datapipes.vocab import coverage_threshold


def _read_all(path, split):
    return pa.concat_tables([pq.read_table(p) for p in PreparedDataset.open(path).shards(split)])


def _sorted_rows(table):
    rows = table.to_pylist()
    return sorted(rows, key=lambda r: tuple((tuple(v) if isinstance(v, list) else v) for v in r.values()))


@pytest.fixture
def raw_copy(raw_dataset, tmp_path):
    path = tmp_path / "raw"
    shutil.copytree(raw_dataset, path)
    return path


@pytest.fixture
def users_removed(raw_copy):
    """Delete the train user-features rows of 25 users; returns (raw dir, train samples of those users)."""
    path = raw_copy / S.TRAIN_USER_FEATURES
    users = pq.read_table(path)
    gone = users.column(S.USER).to_numpy()[:25]
    pq.write_table(users.filter(pc.invert(pc.is_in(users.column(S.USER), pa.array(gone)))), path)
    samples = pq.read_table(raw_copy / S.TRAIN_SAMPLES).column(S.USER).to_numpy()
    return raw_copy, int(np.isin(samples, gone).sum())


def test_samples_without_user_features_are_dropped_and_counted(users_removed, tmp_path):
    raw, affected = users_removed
    assert affected > 0
    meta = prepare(PrepareConfig(raw=str(raw), out=str(tmp_path / "p"), shard_rows=500, on_missing="drop"))
    stats = meta["join_stats"]["train"]
    assert stats["missing_user_dropped"] == affected and stats["missing_user_padded"] == 0
    assert meta["splits"]["train"]["rows"] == stats["rows_written"] == stats["sample_rows"] - affected
    assert _read_all(str(tmp_path / "p"), "train").num_rows == stats["rows_written"]


def test_samples_without_user_features_can_be_kept_with_padding(users_removed, tmp_path):
    raw, affected = users_removed
    meta = prepare(PrepareConfig(raw=str(raw), out=str(tmp_path / "p"), shard_rows=500, on_missing="pad"))
    stats = meta["join_stats"]["train"]
    assert stats["missing_user_padded"] == affected and stats["missing_user_dropped"] == 0
    assert meta["splits"]["train"]["rows"] == stats["sample_rows"]
    empty = 0
    ds = PreparedDataset.open(str(tmp_path / "p"))
    for b in make_dataloader(ds.root, "train", 0, 1, batch_size=256, shuffle=False,
                             transform=HistoryGather(ds.histories("train"))):
        no_history = ~((b.history_items != 0) | (b.history_cats != 0)).any(1)
        assert (b.profile[no_history] == 0).all() and (b.user_id[no_history] > 0).all()
        empty += int(no_history.sum())
    assert empty == affected


def test_item_coverage_keeps_frequent_history_items_and_every_target(raw_dataset, tmp_path):
    out = tmp_path / "p90"
    meta = prepare(PrepareConfig(raw=raw_dataset, out=str(out), shard_rows=500, item_coverage=0.5))
    full = prepare(PrepareConfig(raw=raw_dataset, out=str(tmp_path / "all"), shard_rows=500))
    assert meta["vocab_sizes"]["item"] < full["vocab_sizes"]["item"]
    cov = meta["item_coverage"]
    assert 0.5 <= cov["history_coverage"] < 1.0
    ds = PreparedDataset.open(str(out))
    vocab = ds.vocab("item")
    for name in (S.TRAIN_SAMPLES, S.TEST_SAMPLES):
        assert (vocab.lookup(pq.read_table(os.path.join(raw_dataset, name)).column(S.ITEM).to_numpy()) > 0).all()
    stats = meta["join_stats"]
    for split, name in ((S.SPLITS[0], S.TRAIN_USER_FEATURES), (S.SPLITS[1], S.TEST_USER_FEATURES)):
        hist = pq.read_table(os.path.join(raw_dataset, name)).column(S.HIST_ITEMS).combine_chunks().values.to_numpy()
        unknown = int(((hist != 0) & (vocab.lookup(hist) == 0)).sum())
        assert unknown > 0 and stats[split]["history_unknown_removed"] == 0
        assert stats[split]["history_unknown_items_kept"] == unknown
        # kept in place: item 0 with a known category, as many as there were unknown items
        store = ds.histories(split)
        assert int(((store.items == 0) & (store.cats > 0)).sum()) == unknown and int((store.cats == 0).sum()) == 0
    assert ds.mm_table().shape[0] == vocab.size + 1


def test_max_seq_len_truncates_to_the_most_recent_and_counts_rows(raw_dataset, tmp_path):
    meta = prepare(PrepareConfig(raw=raw_dataset, out=str(tmp_path / "p"), shard_rows=500, max_seq_len=40))
    assert meta["max_seq_len"] == 40
    hist = pq.read_table(os.path.join(raw_dataset, S.TRAIN_USER_FEATURES)).column(S.HIST_ITEMS).to_pylist()
    assert meta["join_stats"]["train"]["history_rows_truncated"] == sum(sum(1 for i in h if i) > 40 for h in hist)
    offsets = PreparedDataset.open(str(tmp_path / "p")).histories("train").offsets
    assert int((offsets[:, 1] - offsets[:, 0]).max()) == 40


def test_result_does_not_depend_on_the_number_of_join_buckets(raw_dataset, tmp_path):
    one = prepare(PrepareConfig(raw=raw_dataset, out=str(tmp_path / "b1"), shard_rows=700, buckets=1))
    five = prepare(PrepareConfig(raw=raw_dataset, out=str(tmp_path / "b5"), shard_rows=700, buckets=5))
    assert one["vocab_sizes"] == five["vocab_sizes"]
    for split in S.SPLITS:
        assert _sorted_rows(_read_all(str(tmp_path / "b1"), split)) == _sorted_rows(_read_all(str(tmp_path / "b5"), split))


def test_same_seed_gives_identical_shards(raw_dataset, tmp_path):
    for name in ("a", "b"):
        prepare(PrepareConfig(raw=raw_dataset, out=str(tmp_path / name), shard_rows=700, buckets=3, seed=4))
    assert _read_all(str(tmp_path / "a"), "train").equals(_read_all(str(tmp_path / "b"), "train"))


def test_duplicate_user_rows_and_targets_without_item_features_or_scl_are_counted(raw_copy, tmp_path):
    users = pq.read_table(raw_copy / S.TEST_USER_FEATURES)
    pq.write_table(pa.concat_tables([users, users.slice(0, 3)]), raw_copy / S.TEST_USER_FEATURES)
    items = pq.read_table(raw_copy / S.ITEM_FEATURES)
    targets = pq.read_table(raw_copy / S.TEST_SAMPLES).column(S.ITEM)
    gone = pa.array(np.unique(targets.to_numpy())[:5])
    pq.write_table(items.filter(pc.invert(pc.is_in(items.column(S.ITEM), gone))), raw_copy / S.ITEM_FEATURES)
    scl = pq.read_table(raw_copy / S.SCL_EMBEDDINGS)
    no_scl = np.setdiff1d(np.unique(targets.to_numpy()), scl.column(S.ITEM).to_numpy())
    meta = prepare(PrepareConfig(raw=str(raw_copy), out=str(tmp_path / "p"), shard_rows=500))
    stats = meta["join_stats"]["test"]
    assert stats["user_feature_duplicates"] == 3
    assert stats["targets_without_item_features"] == int(np.isin(targets.to_numpy(), gone.to_numpy()).sum())
    assert meta["join_stats"]["items"]["vocab_items_without_item_features"] == 5
    assert stats["targets_without_scl"] == int(np.isin(targets.to_numpy(), no_scl).sum()) > 0


def test_counter_spilling_to_disk_matches_numpy_unique(tmp_path):
    rng = np.random.default_rng(0)
    chunks = [rng.integers(-50, 50, 1000) * 7919 for _ in range(20)]
    counter = IdCounter(str(tmp_path), "t", partitions=4, budget_pairs=50)
    for c in chunks:
        counter.add(c)
    assert any(name.startswith("count-t-") for name in os.listdir(tmp_path))
    ids = np.concatenate([counter.partition(p)[0] for p in range(4)])
    counts = np.concatenate([counter.partition(p)[1] for p in range(4)])
    order = np.argsort(ids)
    expected_ids, expected_counts = np.unique(np.concatenate(chunks), return_counts=True)
    keep = expected_ids != 0
    np.testing.assert_array_equal(ids[order], expected_ids[keep])
    np.testing.assert_array_equal(counts[order], expected_counts[keep])


def test_coverage_threshold_keeps_ties_and_reaches_the_requested_share(tmp_path):
    counter = IdCounter(str(tmp_path), "c", partitions=2)
    counter.add(np.repeat([1, 2, 3, 4, 5], [10, 5, 5, 1, 1]))  # 22 interactions
    assert coverage_threshold(counter, 0.4) == (10, 10 / 22)
    assert coverage_threshold(counter, 0.5) == (5, 20 / 22)
    assert coverage_threshold(counter, 0.95) == (1, 1.0)
