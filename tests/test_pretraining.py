"""muse pretrain: InfoNCE and MoCo math, I2I window semantics and the bounded pair sample, the release format
through muse prepare, determinism, resume after a kill, and every bad input (one line, exit 2, nothing written)."""

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cli.main import main
from datapipes import schema as S
from datapipes.prepare import PrepareConfig, prepare
from datapipes.prepared import PreparedDataset
from datapipes.rawread import RawFile
from datapipes.synth import RAW_CONTENT, RAW_CONTENT_COLUMN, RawContentConfig, SynthConfig, synthesize
from pretraining.config import PretrainConfig
from pretraining.content import ContentTable, read_content
from pretraining.moco import MoCo, Projection, info_nce
from pretraining.pairs import BottomK, PairStats, mine_i2i, window_candidates
from pretraining.run import pretrain

TINY = SynthConfig(users=40, items=300, samples=300, seq_len=80, categories=8, clusters=4, seed=3)
WIDTH = 48
FAST = dict(steps=6, batch_size=32, hidden=32, queue=64, checkpoint_every=2, log_every=2)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("pretrain") / "raw"
    synthesize(TINY, str(out), raw_content=RawContentConfig(dim=WIDTH))
    return str(out)


def _cfg(raw: str, out, **kw) -> PretrainConfig:
    return PretrainConfig(raw=raw, content=os.path.join(raw, RAW_CONTENT), out=str(out), **{**FAST, **kw})


@pytest.fixture(scope="module")
def reference(raw, tmp_path_factory):
    """One uninterrupted run: (config, result, bytes of its table)."""
    out = tmp_path_factory.mktemp("reference") / "table"
    cfg = _cfg(raw, out)
    result = pretrain(cfg)
    return cfg, result, (out / S.SCL_EMBEDDINGS).read_bytes()


def test_info_nce_matches_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    q, k, neg, t = unit(5, 8), unit(5, 8), unit(7, 8), 0.2
    direct = 0.0
    for i in range(5):
        pos = float(torch.exp(q[i] @ k[i] / t))
        others = sum(float(torch.exp(q[i] @ neg[j] / t)) for j in range(7))
        direct += -np.log(pos / (pos + others)) / 5
    assert float(info_nce(q, k, neg, t)) == pytest.approx(direct, rel=1e-10)


def test_moco_momentum_update_and_queue_fifo():
    moco = MoCo(Projection(6, 4, out=3), queue=5, momentum=0.9, temperature=0.1, generator=torch.Generator().manual_seed(0))
    for pk, pq_ in zip(moco.momentum_encoder.parameters(), moco.encoder.parameters()):
        assert torch.equal(pk, pq_) and not pk.requires_grad
    with torch.no_grad():
        for p in moco.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in moco.momentum_encoder.parameters()]
    moco.momentum_update()
    for b, pk, pq_ in zip(before, moco.momentum_encoder.parameters(), moco.encoder.parameters()):
        torch.testing.assert_close(pk, 0.9 * b + 0.1 * pq_)
    keys = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    moco.enqueue(keys[:3])
    assert torch.equal(moco.queue[:3], keys[:3]) and int(moco.queue_ptr) == 3
    moco.enqueue(keys)  # rows 3, 4, 0, 1
    assert torch.equal(moco.queue[[3, 4, 0, 1]], keys) and torch.equal(moco.queue[2], keys[2]) and int(moco.queue_ptr) == 2
    many = torch.arange(21, dtype=torch.float32).reshape(7, 3)
    moco.enqueue(many)  # only the newest 5, starting at row 2
    assert torch.equal(moco.queue[[2, 3, 4, 0, 1]], many[2:]) and int(moco.queue_ptr) == 2


def _content(ids, width=4) -> ContentTable:
    ids = np.asarray(ids, np.int64)
    return ContentTable("c", ids, np.ones((ids.size, width), np.float32), np.zeros(width), 1.0)


def _write_histories(path, rows, group_rows):
    """train_user_features.parquet in the release schema with the given histories (left padding allowed)."""
    n = len(rows)
    cols = {S.USER: np.arange(1, n + 1), **{c: np.ones(n, np.int64) for c in S.PROFILE_COLUMNS},
            S.HIST_ITEMS: pa.array(rows, pa.list_(pa.int64())), S.HIST_CATS: pa.array([[7] * len(r) for r in rows], pa.list_(pa.int64()))}
    pq.write_table(pa.table(cols, schema=S.arrow_schema(S.TRAIN_USER_FEATURES)), path, row_group_size=group_rows)


def test_i2i_pairs_are_behaviors_at_most_window_apart_in_one_users_sequence(tmp_path):
    content = _content([10, 20, 30, 50, 60, 70])          # item 40 has no content
    rows = [[0, 0, 10, 20, 10, 30, 40], [50, 60], [70]]  # padding, same item, missing content, short users
    _write_histories(tmp_path / S.TRAIN_USER_FEATURES, rows, group_rows=1)
    pairs, stats = mine_i2i(str(tmp_path), content, window=2, max_pairs=100, seed=0)
    got = {(int(content.ids[a]), int(content.ids[b])) for a, b in pairs}
    assert got == {(10, 20), (20, 10), (10, 30), (20, 30), (50, 60)} and len(pairs) == 5
    # user 1: 4 pairs at d=1, 3 at d=2 (one same-item, two with item 40); user 2: one; none across users
    assert (stats.candidates, stats.same_item, stats.missing_content, stats.usable, stats.kept) == (8, 1, 2, 5, 5)
    one, _ = mine_i2i(str(tmp_path), content, window=1, max_pairs=100, seed=0)
    assert {(int(content.ids[a]), int(content.ids[b])) for a, b in one} == {(10, 20), (20, 10), (10, 30), (50, 60)}


def test_pair_sample_is_bounded_uniform_and_independent_of_row_groups(tmp_path):
    rng = np.random.default_rng(0)
    ids = np.arange(1, 41)
    rows = [list(rng.choice(ids, size=rng.integers(5, 30))) for _ in range(30)]
    full, capped = {}, {}
    for groups in (1, 30):
        d = tmp_path / f"g{groups}"
        d.mkdir()
        _write_histories(d / S.TRAIN_USER_FEATURES, rows, group_rows=groups)
        full[groups], stats = mine_i2i(str(d), _content(ids), window=3, max_pairs=10**6, seed=1)
        capped[groups], cstats = mine_i2i(str(d), _content(ids), window=3, max_pairs=50, seed=1)
        assert cstats.usable == stats.usable == len(full[groups]) and cstats.kept == 50
    np.testing.assert_array_equal(full[1], full[30])
    np.testing.assert_array_equal(capped[1], capped[30])
    as_set = lambda p: {tuple(map(int, x)) for x in p}
    assert as_set(capped[1]) <= as_set(full[1])
    other, _ = mine_i2i(str(tmp_path / "g1"), _content(ids), window=3, max_pairs=50, seed=2)
    assert as_set(other) != as_set(capped[1])


def test_bottom_k_keeps_the_smallest_priorities_across_compactions():
    rng = np.random.default_rng(0)
    priority = rng.integers(0, 2**63, 1000).astype(np.uint64)
    pairs = np.stack([np.arange(1000), np.arange(1000)], axis=1)
    reservoir = BottomK(10)
    for start in range(0, 1000, 7):
        reservoir.add(priority[start:start + 7], pairs[start:start + 7])
    np.testing.assert_array_equal(reservoir.result()[:, 0], np.argsort(priority)[:10])


def test_table_is_in_release_format_and_muse_prepare_reads_it(raw, reference, tmp_path):
    cfg, result, _ = reference
    assert result.steps == 6 and [s for s, _ in result.losses] == [2, 4, 6]
    assert result.pairs.kept > 100 and not os.path.exists(cfg.resolved_checkpoint_dir())
    rf = RawFile(cfg.out, S.SCL_EMBEDDINGS)   # prepare's reader: exact schema, 128 int8 per row, no nulls
    batches = list(rf.batches([S.ITEM, S.EMBEDDING]))
    rf.close()
    emb = np.concatenate([b[S.EMBEDDING].values.reshape(-1, S.MM_DIM) for b in batches]).astype(np.float64)
    content = read_content(os.path.join(raw, RAW_CONTENT))
    np.testing.assert_array_equal(np.concatenate([b[S.ITEM] for b in batches]), content.ids)
    norms = np.linalg.norm(emb, axis=1)
    assert (norms <= 127.0 + 1e-9).all() and (norms > 110).all()   # unit vectors, truncated toward 0
    meta = prepare(PrepareConfig(raw=cfg.out, out=str(tmp_path / "prepared")))
    ds = PreparedDataset.open(str(tmp_path / "prepared"))
    mm = np.asarray(ds.mm_table())
    assert meta["join_stats"]["items"]["vocab_items_without_scl"] == 0
    assert mm.shape[1] == S.MM_DIM and np.abs(mm[1:]).sum(1).min() > 0


def test_same_seed_same_bytes_other_seed_other_bytes(raw, reference, tmp_path):
    cfg, _, table = reference
    pretrain(_cfg(raw, tmp_path / "a"))
    pretrain(_cfg(raw, tmp_path / "b", seed=1))
    assert (tmp_path / "a" / S.SCL_EMBEDDINGS).read_bytes() == table
    assert (tmp_path / "b" / S.SCL_EMBEDDINGS).read_bytes() != table
    assert (tmp_path / "a" / "pretrain.json").read_bytes() == open(os.path.join(cfg.out, "pretrain.json"), "rb").read()


def test_killed_run_resumes_from_its_checkpoint_to_the_same_bytes(raw, reference, tmp_path):
    _, _, table = reference
    cfg = _cfg(raw, tmp_path / "out")

    def kill_at_5(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, on_step=kill_at_5)
    assert not (tmp_path / "out").exists() and os.path.exists(os.path.join(cfg.resolved_checkpoint_dir(), "state.pt"))
    changed = _cfg(raw, tmp_path / "out", lr=0.01)
    assert main(["pretrain", "--raw", raw, "--content", changed.content, "--out", changed.out, "--steps", "6",
                 "--batch-size", "32", "--hidden", "32", "--queue", "64", "--log-every", "2", "--lr", "0.01"]) == 2
    result = pretrain(cfg)
    assert result.resumed_from == 4 and result.steps == 6
    assert (tmp_path / "out" / S.SCL_EMBEDDINGS).read_bytes() == table
    assert not os.path.exists(cfg.resolved_checkpoint_dir())


def test_loss_falls_and_scl_pairs_train_too(raw, tmp_path):
    content = read_content(os.path.join(raw, RAW_CONTENT))
    pairs = tmp_path / "pairs.parquet"
    q = np.concatenate([content.ids[:60], content.ids[:3], [12345]])
    i = np.concatenate([content.ids[60:120], content.ids[:3], content.ids[:1]])
    pq.write_table(pa.table({"query_item": q, "item": i}), pairs)
    result = pretrain(_cfg(raw, tmp_path / "scl", pairs=str(pairs), steps=40, log_every=10))
    assert (result.pairs.candidates, result.pairs.same_item, result.pairs.missing_content, result.pairs.kept) == (64, 3, 1, 60)
    assert result.losses[-1][1] < result.losses[0][1]


def test_projection_baseline_keeps_content_cosines_and_npy_layout_matches_parquet(raw, tmp_path):
    content = read_content(os.path.join(raw, RAW_CONTENT))
    np.save(tmp_path / "c.npy", content.vectors)
    np.save(tmp_path / "c.ids.npy", content.ids)
    for name, path in (("pq", content.path), ("npy", str(tmp_path / "c.npy"))):
        pretrain(PretrainConfig(raw=raw, content=path, out=str(tmp_path / name), method="projection"))
    table = (tmp_path / "pq" / S.SCL_EMBEDDINGS).read_bytes()
    assert (tmp_path / "npy" / S.SCL_EMBEDDINGS).read_bytes() == table
    emb = np.stack(pq.read_table(tmp_path / "pq" / S.SCL_EMBEDDINGS).column(S.EMBEDDING).to_numpy(zero_copy_only=False)).astype(float)
    x = content.standardized(np.arange(len(content))).astype(float)
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)
    a, b = (unit(x[:100]) @ unit(x[:100]).T).ravel(), (unit(emb[:100]) @ unit(emb[:100]).T).ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.9


def test_synth_raw_content_leaves_the_release_files_unchanged(raw, tmp_path):
    synthesize(TINY, str(tmp_path / "plain"))
    assert sorted(os.listdir(tmp_path / "plain")) == sorted(S.RAW_FILES)
    for name in S.RAW_FILES:
        assert (tmp_path / "plain" / name).read_bytes() == open(os.path.join(raw, name), "rb").read(), name
    table = pq.read_table(os.path.join(raw, RAW_CONTENT))
    assert table.num_rows == TINY.items and set(table.column(S.ITEM).to_numpy()) == set(
        pq.read_table(os.path.join(raw, S.ITEM_FEATURES)).column(S.ITEM).to_numpy())
    assert len(table.column(RAW_CONTENT_COLUMN)[0]) == WIDTH


def _bad_content(raw, tmp_path, kind):
    table = pq.read_table(os.path.join(raw, RAW_CONTENT))
    ids = table.column(S.ITEM).to_numpy()
    vectors = np.stack(table.column(RAW_CONTENT_COLUMN).to_numpy(zero_copy_only=False)).astype(np.float32)
    path = tmp_path / "content.parquet"
    if kind == "missing":
        ids, vectors = ids[5:], vectors[5:]
    if kind == "nan":
        vectors[7, 3] = np.nan
    lists = [list(v) for v in vectors]
    if kind == "width":
        lists[9] = lists[9][:-1]
    pq.write_table(pa.table({S.ITEM: ids, RAW_CONTENT_COLUMN: pa.array(lists, pa.list_(pa.float32()))}), path)
    return str(path)


@pytest.mark.parametrize("kind, expected", [
    ("missing", "content.parquet: 205: 5 of the 300 items of"),
    ("nan", "content.parquet: content: row 7"),
    ("width", "content.parquet: content: row 9 has 47 values, but row 0 has 48"),
    ("empty_pairs", "pairs.parquet: (file): empty pairs file"),
    ("no_content", "--content"),
    ("no_raw", "--raw"),
    ("no_pairs", "--pairs"),
    ("npy_ids", "c.ids.npy: ids: 299 ids for the 300 vectors"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(raw, tmp_path, capsys, kind, expected):
    content, raw_dir, extra = os.path.join(raw, RAW_CONTENT), raw, []
    if kind in ("missing", "nan", "width"):
        content = _bad_content(raw, tmp_path, kind)
    if kind == "empty_pairs":
        pq.write_table(pa.table({"query_item": pa.array([], pa.int64()), "item": pa.array([], pa.int64())}), tmp_path / "pairs.parquet")
        extra = ["--pairs", str(tmp_path / "pairs.parquet")]
    if kind == "no_pairs":
        extra = ["--pairs", str(tmp_path / "nope.parquet")]
    if kind == "no_content":
        content = str(tmp_path / "nope.parquet")
    if kind == "no_raw":
        raw_dir = str(tmp_path / "nope")
    if kind == "npy_ids":
        c = read_content(content)
        np.save(tmp_path / "c.npy", c.vectors)
        np.save(tmp_path / "c.ids.npy", c.ids[1:])
        content = str(tmp_path / "c.npy")
    before = set(os.listdir(tmp_path))
    out = tmp_path / "out"
    assert main(["pretrain", "--raw", raw_dir, "--content", content, "--out", str(out), "--steps", "2", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert set(os.listdir(tmp_path)) == before   # neither OUT nor OUT.ckpt
