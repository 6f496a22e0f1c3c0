"""Synthetic raw data: exact schema, determinism, padding conventions, the planted lifelong signal,
and 100,000-long sequences through prepare and the reader."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from common.errors import UserError
from datapipes import schema as S
from datapipes.histories import HistoryGather
from datapipes.prepare import PrepareConfig, prepare
from datapipes.prepared import PreparedDataset
from datapipes.reader import make_dataloader
from datapipes.synth import SynthConfig, synthesize

TINY = SynthConfig(users=40, items=300, samples=300, seq_len=80, categories=8, clusters=4, seed=3)


def _auc(score, label):
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    pos = label.sum()
    return (ranks[label == 1].sum() - pos * (pos + 1) / 2) / (pos * (len(label) - pos))


def test_files_have_exactly_the_release_schema(raw_dataset):
    assert sorted(os.listdir(raw_dataset)) == sorted(S.RAW_FILES)
    for name in S.RAW_FILES:
        assert pq.read_schema(os.path.join(raw_dataset, name)).equals(S.arrow_schema(name)), name


def test_ids_are_hashed_nonzero_int64_and_labels_one_hot(raw_dataset):
    samples = pq.read_table(os.path.join(raw_dataset, S.TRAIN_SAMPLES))
    users = samples.column(S.USER).to_numpy()
    assert (users != 0).all() and (users < 0).any() and np.abs(users).max() > 2**40
    labels = np.stack(samples.column(S.LABEL).to_numpy(zero_copy_only=False))
    assert labels.shape[1] == 2 and (labels.sum(1) == 1).all()
    assert 0.2 < labels[:, 1].mean() < 0.8
    emb = np.stack(pq.read_table(os.path.join(raw_dataset, S.SCL_EMBEDDINGS)).column(S.EMBEDDING).to_numpy(zero_copy_only=False))
    assert emb.shape[1] == 128 and emb.dtype == np.int8 and emb.min() >= -127


def test_histories_are_left_padded_or_shorter_and_aligned(raw_dataset):
    table = pq.read_table(os.path.join(raw_dataset, S.TRAIN_USER_FEATURES))
    items, cats = table.column(S.HIST_ITEMS).to_pylist(), table.column(S.HIST_CATS).to_pylist()
    full, short = 0, 0
    for hi, hc in zip(items, cats):
        assert len(hi) == len(hc)
        real = np.array(hi) != 0
        np.testing.assert_array_equal(real, np.array(hc) != 0)
        if len(hi) == 120:
            full += 1
            assert real[np.argmax(real):].all()  # zeros only on the left
        else:
            short += 1
            assert len(hi) < 120 and real.all()
    assert full > 0 and short > 0


def test_test_users_carry_the_same_sequences_in_test_user_features(raw_dataset):
    train = {r[S.USER]: r[S.HIST_ITEMS] for r in pq.read_table(os.path.join(raw_dataset, S.TRAIN_USER_FEATURES)).to_pylist()}
    test = pq.read_table(os.path.join(raw_dataset, S.TEST_USER_FEATURES)).to_pylist()
    test_users = set(pq.read_table(os.path.join(raw_dataset, S.TEST_SAMPLES)).column(S.USER).to_pylist())
    assert {r[S.USER] for r in test} == test_users
    shared = [r for r in test if r[S.USER] in train]
    assert shared and all(train[r[S.USER]] == r[S.HIST_ITEMS] for r in shared)


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        synthesize(SynthConfig(**{**TINY.__dict__, "seed": seed}), str(tmp_path / name))
    for name in S.RAW_FILES:
        a, b, c = (pq.read_table(tmp_path / d / name) for d in "abc")
        assert a.equals(b) and not a.equals(c), name


def test_clicks_follow_lifelong_interests_more_than_recent_ones(prepared_dataset):
    """Share of history behaviors in the target's content cluster (cosine > 0.5) predicts clicks much
    better over the whole history than over the recent 50: the signal a long-sequence model can use."""
    ds = PreparedDataset.open(prepared_dataset)
    mm = np.asarray(ds.mm_table(), dtype=np.float32)
    mm /= np.maximum(np.linalg.norm(mm, axis=1, keepdims=True), 1e-6)
    whole, recent, labels = [], [], []
    for b in make_dataloader(prepared_dataset, "train", 0, 1, batch_size=256, shuffle=False,
                             transform=HistoryGather(ds.histories("train"))):
        hist = b.history_items.numpy()
        close = (np.einsum("bld,bd->bl", mm[hist], mm[b.target_item.numpy()]) > 0.5) & (hist > 0)
        whole.append(close.sum(1) / np.maximum((hist > 0).sum(1), 1))
        recent.append(close[:, -50:].sum(1) / np.maximum((hist[:, -50:] > 0).sum(1), 1))
        labels.append(b.labels.numpy())
    y = np.concatenate(labels)
    auc_whole, auc_recent = _auc(np.concatenate(whole), y), _auc(np.concatenate(recent), y)
    assert auc_whole > 0.7 and auc_whole > auc_recent + 0.08, (auc_whole, auc_recent)


def test_bad_sizes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--seq-len"):
        synthesize(SynthConfig(seq_len=100_001), str(tmp_path / "x"))
    with pytest.raises(UserError, match="--clusters"):
        synthesize(SynthConfig(items=3, clusters=5), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_sequences_of_100k_go_through_prepare_and_the_reader(tmp_path):
    cfg = SynthConfig(users=4, items=400, samples=12, seq_len=100_000, categories=8, clusters=4, seed=1)
    synthesize(cfg, str(tmp_path / "raw"))
    hist = pq.read_table(tmp_path / "raw" / S.TRAIN_USER_FEATURES).column(S.HIST_ITEMS).combine_chunks()
    real = [int(np.count_nonzero(h)) for h in hist.to_numpy(zero_copy_only=False)]
    assert max(len(h) for h in hist.to_pylist()) == 100_000
    meta = prepare(PrepareConfig(raw=str(tmp_path / "raw"), out=str(tmp_path / "p"), shard_rows=4))
    assert meta["max_seq_len"] >= max(real) > 30_000
    store = PreparedDataset.open(str(tmp_path / "p")).histories("train")
    loader = make_dataloader(str(tmp_path / "p"), "train", 0, 1, batch_size=4, shuffle=False,
                             transform=HistoryGather(store))
    longest = 0
    for batch in loader:
        lengths = (batch.history_items > 0).sum(1)
        assert batch.history_items.shape[1] == int(lengths.max())
        assert (batch.history_items[:, -1] > 0).all()
        longest = max(longest, int(lengths.max()))
    assert longest == max(real)
