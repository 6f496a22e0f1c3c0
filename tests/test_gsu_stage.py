"""GsuStage (model/gsu/__init__.py): RawBatch -> Batch for every GSU mode, checked position by position on a small
hand-built batch, and its pickling for DataLoader workers."""

import pickle

import numpy as np
import pytest
import torch

from datapipes.batch import HISTORY_FEATURES, SEQUENCE_FEATURES, SPARSE_FEATURES, RawBatch
from model.config import ModelConfig
from model.gsu import GsuStage, cosine_topk
from model.gsu.table import MMTable

K, RECENT = 3, 4
# Four samples, L = 10, left-padded; sample 1 has a hole (0 = unknown item) inside its history, sample 2 has
# fewer behaviors than RECENT, sample 3 has none. Items 1..29, category of item i = i % 5 + 1.
HISTORY = torch.tensor([
    [11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
    [0, 0, 21, 3, 0, 8, 9, 21, 25, 6],
    [0, 0, 0, 0, 0, 0, 0, 4, 9, 14],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
])
TARGETS = torch.tensor([13, 21, 7, 2])


def category(items: torch.Tensor) -> torch.Tensor:
    return torch.where(items > 0, items % 5 + 1, torch.zeros_like(items))


def raw_batch() -> RawBatch:
    b = HISTORY.shape[0]
    return RawBatch(
        labels=torch.tensor([1.0, 0.0, 0.0, 1.0]), user_id=torch.tensor([5, 6, 7, 8]),
        profile=torch.arange(b * 5).view(b, 5) + 100, target_item=TARGETS, target_cat=category(TARGETS),
        item_city=torch.tensor([31, 32, 33, 34]), item_province=torch.tensor([41, 42, 43, 44]),
        history_items=HISTORY, history_cats=category(HISTORY),
    )


@pytest.fixture(scope="module")
def table() -> torch.Tensor:
    t = torch.randint(-127, 128, (30, 8), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    t[0] = 0
    t[9] = 0  # an item without content: cosine 0
    return t


def cosine(table: torch.Tensor, a: int, b: int) -> float:
    x, y = table[a].double(), table[b].double()
    den = float(x.norm() * y.norm())
    return float(x @ y) / den if den else 0.0


def features(kjt, key):
    """Per-sample lists of the ids of one KJT feature."""
    jt = kjt[key]
    return [v.tolist() for v in torch.split(jt.values(), jt.lengths().tolist())]


def stage(table, gsu: str) -> GsuStage:
    preset = {"none": "din", "category": "sim_hard", "multimodal": "muse", "id": "sim_soft", "attention": "twin"}[gsu]
    return GsuStage(ModelConfig.preset(preset, k=K, recent_len=RECENT), MMTable(table))


def real_history(b: int):
    return [(p, int(i)) for p, i in enumerate(HISTORY[b].tolist()) if i != 0]


@pytest.mark.parametrize("gsu", ["none", "category", "multimodal", "id", "attention"])
def test_common_features_of_every_mode(table, gsu):
    batch = stage(table, gsu)(raw_batch())
    assert batch.sparse_features.keys() == list(SPARSE_FEATURES)
    assert batch.sparse_features.lengths().tolist() == [1] * (4 * len(SPARSE_FEATURES))
    sparse = {key: [v[0] for v in features(batch.sparse_features, key)] for key in SPARSE_FEATURES}
    assert sparse["user_id"] == [5, 6, 7, 8]
    for i in range(5):
        assert sparse[f"profile_{i + 1}"] == (torch.arange(4) * 5 + 100 + i).tolist()
    assert sparse["item_city"] == [31, 32, 33, 34] and sparse["item_province"] == [41, 42, 43, 44]
    keys = list(SEQUENCE_FEATURES) + (list(HISTORY_FEATURES) if gsu in ("id", "attention") else [])
    assert batch.sequence_features.keys() == keys
    assert features(batch.sequence_features, "target_item") == [[13], [21], [7], [2]]
    assert features(batch.sequence_features, "target_cat") == [[c] for c in category(TARGETS).tolist()]
    # recent: the last RECENT non-padding behaviors, oldest first, cosines aligned, 0 after.
    recent = features(batch.sequence_features, "recent_item")
    assert recent == [[17, 18, 19, 20], [8, 9, 21, 25, 6][-RECENT:], [4, 9, 14], []]
    assert features(batch.sequence_features, "recent_cat") == [category(torch.tensor(r)).tolist() for r in recent]
    assert batch.recent_scores.shape == (4, RECENT) and batch.recent_scores.dtype == torch.float32
    for b, items in enumerate(recent):
        want = [cosine(table, i, int(TARGETS[b])) for i in items] + [0.0] * (RECENT - len(items))
        assert batch.recent_scores[b].tolist() == pytest.approx(want, abs=1e-6)
    assert batch.recent_scores[2, 1] == 0.0  # item 9 has no content
    assert torch.equal(batch.labels, torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert batch.gsu_scores.shape == (4, K) and batch.gsu_scores.dtype == torch.float32


def test_multimodal_selects_the_cosine_top_k(table):
    batch = stage(table, "multimodal")(raw_batch())
    chosen = features(batch.sequence_features, "gsu_item")
    for b in range(4):
        ranked = sorted(real_history(b), key=lambda pi: (-cosine(table, pi[1], int(TARGETS[b])), -pi[0]))[:K]
        assert chosen[b] == [i for _, i in ranked]
        want = [cosine(table, i, int(TARGETS[b])) for _, i in ranked]
        assert batch.gsu_scores[b].tolist() == pytest.approx(want + [0.0] * (K - len(want)), abs=1e-6)
    assert features(batch.sequence_features, "gsu_cat") == [category(torch.tensor(c)).tolist() for c in chosen]
    scores, positions, valid = cosine_topk(table, TARGETS, HISTORY, K)
    assert torch.equal(batch.gsu_scores, torch.where(valid, scores, torch.zeros(())))
    assert batch.history_scores is None


def test_category_selects_the_most_recent_of_the_target_category(table):
    batch = stage(table, "category")(raw_batch())
    chosen = features(batch.sequence_features, "gsu_item")
    target_cats = category(TARGETS).tolist()
    for b in range(4):
        same = [i for _, i in reversed(real_history(b)) if int(category(torch.tensor(i))) == target_cats[b]][:K]
        assert chosen[b] == same  # newest first
        want = [cosine(table, i, int(TARGETS[b])) for i in same]
        assert batch.gsu_scores[b].tolist() == pytest.approx(want + [0.0] * (K - len(want)), abs=1e-6)
    assert chosen[0] == [18, 13] and chosen[1] == [6, 21, 21]
    assert features(batch.sequence_features, "gsu_cat") == [category(torch.tensor(c)).tolist() for c in chosen]


def test_din_has_no_lifelong_behaviors(table):
    batch = stage(table, "none")(raw_batch())
    assert features(batch.sequence_features, "gsu_item") == [[], [], [], []]
    assert features(batch.sequence_features, "gsu_cat") == [[], [], [], []]
    assert not batch.gsu_scores.any() and batch.history_scores is None


@pytest.mark.parametrize("gsu", ["id", "attention"])
def test_in_model_gsu_gets_the_whole_history(table, gsu):
    batch = stage(table, gsu)(raw_batch())
    assert features(batch.sequence_features, "gsu_item") == [[], [], [], []]
    assert not batch.gsu_scores.any()
    hist = features(batch.sequence_features, "hist_item")
    assert hist == [[i for _, i in real_history(b)] for b in range(4)]
    assert features(batch.sequence_features, "hist_cat") == [category(torch.tensor(h)).tolist() for h in hist]
    assert batch.history_scores.shape == HISTORY.shape and batch.history_scores.dtype == torch.float32
    for b, items in enumerate(hist):
        want = [cosine(table, i, int(TARGETS[b])) for i in items]
        assert batch.history_scores[b].tolist() == pytest.approx(want + [0.0] * (HISTORY.shape[1] - len(items)), abs=1e-6)


def test_short_histories_and_k_larger_than_l(table):
    raw = raw_batch()
    raw.history_items, raw.history_cats = HISTORY[:, -2:], category(HISTORY[:, -2:])
    batch = stage(table, "multimodal")(raw)
    assert [len(x) for x in features(batch.sequence_features, "gsu_item")] == [2, 2, 2, 0]
    assert batch.gsu_scores.shape == (4, K) and not batch.gsu_scores[:, 2].any()
    assert batch.recent_scores.shape == (4, RECENT)


def test_stage_pickles_and_shares_a_memory_mapped_table(tmp_path):
    big = torch.randint(-127, 128, (4000, 128), dtype=torch.int8)
    big[0] = 0
    np.save(tmp_path / "mm_table.npy", big.numpy())
    loaded = MMTable.load(str(tmp_path))
    gsu = GsuStage(ModelConfig.preset("muse", k=K, recent_len=RECENT), loaded)
    blob = pickle.dumps(gsu)
    assert len(blob) < big.numel() // 2  # the table travels by path (workers map the same file), not by value
    copy = pickle.loads(blob)
    assert copy.mm_table.source == loaded.source and torch.equal(copy.mm_table.table, big)
    a, b = gsu(raw_batch()), copy(raw_batch())
    assert torch.equal(a.gsu_scores, b.gsu_scores) and torch.equal(a.recent_scores, b.recent_scores)
    assert torch.equal(a.sequence_features.values(), b.sequence_features.values())


def test_bad_config():
    with pytest.raises(ValueError, match="config"):
        GsuStage(object(), torch.zeros(3, 4, dtype=torch.int8))
