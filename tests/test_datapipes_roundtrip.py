"""synth -> prepare -> PreparedDataset/reader/history store round trip: ids, sequences, embeddings, metadata."""

import hashlib
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from datapipes import schema as S
from datapipes.batch import PROFILE_FIELDS
from datapipes.histories import HistoryGather
from datapipes.prepared import PreparedDataset
from datapipes.reader import make_dataloader


def _raw(raw_dir, name):
    return pq.read_table(os.path.join(raw_dir, name)).to_pylist()


def _expected_rows(raw_dir, split):
    """Reference join in plain Python: one tuple of raw ids per sample, history without padding."""
    samples_file, users_file = S.SPLIT_FILES[split]
    users = {r[S.USER]: r for r in _raw(raw_dir, users_file)}
    items = {r[S.ITEM]: r for r in _raw(raw_dir, S.ITEM_FEATURES)}
    rows = []
    for s in _raw(raw_dir, samples_file):
        u = users[s[S.USER]]
        hist = [(i, c) for i, c in zip(u[S.HIST_ITEMS], u[S.HIST_CATS]) if i != 0]
        it = items[s[S.ITEM]]
        rows.append((s[S.LABEL][1], s[S.USER], tuple(u[c] for c in S.PROFILE_COLUMNS), s[S.ITEM],
                     it[S.CATEGORY], it[S.CITY], it[S.PROVINCE], tuple(hist)))
    return sorted(rows)


def _prepared_rows(ds, split):
    """The prepared split read back through the reader, mapped back to raw ids through the vocabularies."""
    raw = {space: np.concatenate([[0], ds.vocab(space).ids]) for space in S.ID_SPACES}
    rows = []
    for b in make_dataloader(ds.root, split, rank=0, world_size=1, batch_size=64, shuffle=False,
                             transform=HistoryGather(ds.histories(split))):
        hist_items, hist_cats = b.history_items.numpy(), b.history_cats.numpy()
        for i in range(b.batch_size):
            valid = (hist_items[i] != 0) | (hist_cats[i] != 0)
            # Left padding only: once a real behavior starts, no padding follows.
            assert not valid.any() or valid[np.argmax(valid):].all()
            hist = tuple(zip(raw["item"][hist_items[i][valid]].tolist(), raw["category"][hist_cats[i][valid]].tolist()))
            profile = tuple(int(raw[f][b.profile[i, j]]) for j, f in enumerate(PROFILE_FIELDS))
            rows.append((int(b.labels[i]), int(raw["user"][b.user_id[i]]), profile, int(raw["item"][b.target_item[i]]),
                         int(raw["category"][b.target_cat[i]]), int(raw["item_city"][b.item_city[i]]),
                         int(raw["item_province"][b.item_province[i]]), hist))
    return sorted(rows)


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_sample_round_trips_with_its_ids_and_ordered_history(raw_dataset, prepared_dataset, split):
    ds = PreparedDataset.open(prepared_dataset)
    assert _prepared_rows(ds, split) == _expected_rows(raw_dataset, split)


def test_mm_table_rows_are_the_raw_scl_rows_through_the_item_vocab(raw_dataset, prepared_dataset):
    ds = PreparedDataset.open(prepared_dataset)
    table = ds.mm_table()
    vocab = ds.vocab("item")
    assert table.dtype == np.int8 and table.shape == (ds.metadata.vocab_sizes["item"] + 1, 128)
    assert not table[0].any()
    scl = pq.read_table(os.path.join(raw_dataset, S.SCL_EMBEDDINGS))
    ids = scl.column(S.ITEM).to_numpy()
    emb = np.stack(scl.column(S.EMBEDDING).to_numpy(zero_copy_only=False))
    idx = vocab.lookup(ids)
    np.testing.assert_array_equal(table[idx[idx > 0]], emb[idx > 0])
    without = np.setdiff1d(np.arange(1, vocab.size + 1), idx)
    assert without.size == ds.metadata.join_stats["items"]["vocab_items_without_scl"] > 0
    assert not table[without].any()


def test_vocabularies_are_contiguous_frequency_ordered_and_cover_every_id(raw_dataset, prepared_dataset):
    ds = PreparedDataset.open(prepared_dataset)
    samples = pq.read_table(os.path.join(raw_dataset, S.TRAIN_SAMPLES))
    for space in S.ID_SPACES:
        vocab = ds.vocab(space)
        assert vocab.size == ds.metadata.vocab_sizes[space] > 0
        assert np.all(np.diff(vocab.counts) <= 0)
        assert np.unique(vocab.ids).size == vocab.size and not (vocab.ids == 0).any()
        np.testing.assert_array_equal(vocab.lookup(vocab.ids), np.arange(1, vocab.size + 1))
        assert vocab.lookup(np.array([0]))[0] == 0
    assert (ds.vocab("user").lookup(samples.column(S.USER).to_numpy()) > 0).all()
    assert (ds.vocab("item").lookup(samples.column(S.ITEM).to_numpy()) > 0).all()


def test_metadata_follows_the_contract(raw_dataset, prepared_dataset):
    with open(os.path.join(prepared_dataset, "metadata.json")) as f:
        meta = json.load(f)
    assert meta["schema_version"] == 2
    assert set(meta["vocab_sizes"]) == set(S.ID_SPACES)
    assert (meta["recent_len"], meta["mm_dim"], meta["mm_dtype"]) == (50, 128, "int8")
    assert meta["max_seq_len"] == 120
    raw_rows = {split: pq.ParquetFile(os.path.join(raw_dataset, S.SPLIT_FILES[split][0])).metadata.num_rows
                for split in S.SPLITS}
    for split in S.SPLITS:
        info = meta["splits"][split]
        assert info["rows"] == sum(info["shard_rows"]) == raw_rows[split]
        assert all(n == 300 for n in info["shard_rows"][:-1]) and len(info["shards"]) >= 2
        for rel, n in zip(info["shards"], info["shard_rows"]):
            assert pq.ParquetFile(os.path.join(prepared_dataset, rel)).metadata.num_rows == n
        assert meta["join_stats"][split]["rows_written"] == raw_rows[split]
        assert info["histories"] == f"{split}/histories"
        users = pq.read_table(os.path.join(raw_dataset, S.SPLIT_FILES[split][1]))
        real = sum(sum(1 for i in h if i) for h in users.column(S.HIST_ITEMS).to_pylist())
        assert info["history_entries"] == real and info["users_with_history"] == users.num_rows
    for name, digest in meta["sources"].items():
        with open(os.path.join(raw_dataset, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest
    assert set(meta["sources"]) == set(S.RAW_FILES)


def test_item_attributes_are_the_item_features_through_the_vocabularies(raw_dataset, prepared_dataset):
    ds = PreparedDataset.open(prepared_dataset)
    attrs = ds.item_attributes()
    raw = {space: np.concatenate([[0], ds.vocab(space).ids]) for space in ("category", "item_city", "item_province")}
    items = ds.vocab("item")
    expected = {r[S.ITEM]: (r[S.CATEGORY], r[S.CITY], r[S.PROVINCE]) for r in _raw(raw_dataset, S.ITEM_FEATURES)}
    assert attrs["category"][0] == attrs["item_city"][0] == attrs["item_province"][0] == 0
    for index in range(1, items.size + 1):
        got = (raw["category"][attrs["category"][index]], raw["item_city"][attrs["item_city"][index]],
               raw["item_province"][attrs["item_province"][index]])
        assert got == expected[items.ids[index - 1]]


def test_the_history_store_holds_each_users_history_once_and_maps_by_user_index(raw_dataset, prepared_dataset):
    ds = PreparedDataset.open(prepared_dataset)
    raw = {space: np.concatenate([[0], ds.vocab(space).ids]) for space in ("user", "item", "category", *PROFILE_FIELDS)}
    for split in S.SPLITS:
        store = ds.histories(split)
        users = _raw(raw_dataset, S.SPLIT_FILES[split][1])
        assert store.num_users == ds.metadata.vocab_sizes["user"] and store.entries == sum(
            sum(1 for i in u[S.HIST_ITEMS] if i) for u in users)
        for u in users:
            index = int(ds.vocab("user").lookup(np.array([u[S.USER]]))[0])
            items, cats = store.history(index)
            expected = [(i, c) for i, c in zip(u[S.HIST_ITEMS], u[S.HIST_CATS]) if i != 0]
            assert list(zip(raw["item"][items].tolist(), raw["category"][cats].tolist())) == expected
            profile = [int(raw[f][store.profile[index, j]]) for j, f in enumerate(PROFILE_FIELDS)]
            assert profile == [u[c] for c in S.PROFILE_COLUMNS]
        sample_users = set(ds.vocab("user").lookup(np.array([r[S.USER] for r in users])).tolist())
        others = np.setdiff1d(np.arange(store.num_users + 1), np.array(sorted(sample_users)))
        assert not (store.offsets[others, 1] - store.offsets[others, 0]).any()
