"""Product quantization (model/gsu/pq.py, model/gsu/pq_topk.py): codebooks and codes, the approximate GSU's
contract (shapes, padding, ties, exact re-scored scores), its recall against the exact GSU on clustered data,
and the GSU stage running it."""

import pickle

import pytest
import torch

from common.errors import UserError
from datapipes.batch import RawBatch
from model.config import ModelConfig
from model.gsu import GsuStage, PQIndex, PQSettings, cosine_topk, pair_cosine, pq_topk
from model.gsu.pq import ZERO_CODE, encode, train_codebooks, unit_rows
from model.gsu.table import row_norms

D, M, CLUSTERS, ROWS = 32, 8, 12, 3000
SETTINGS = PQSettings(m=M, sample_rows=ROWS, iterations=15, seed=0)


def clustered_table(seed: int = 0) -> torch.Tensor:
    """int8 [ROWS, D]: row i belongs to cluster i % CLUSTERS (unit centroid + noise, as muse synth writes content)."""
    g = torch.Generator().manual_seed(seed)
    centroids = torch.randn(CLUSTERS, D, generator=g)
    centroids /= centroids.norm(dim=1, keepdim=True)
    x = centroids[torch.arange(ROWS) % CLUSTERS] + 0.6 * torch.randn(ROWS, D, generator=g) / D ** 0.5
    table = torch.trunc(x.clamp(-1, 1) * 127).to(torch.int8)
    table[0] = 0
    return table


def interest_histories(batch: int, length: int, seed: int) -> tuple:
    """(targets [B], histories [B, L]): each sample's behaviors from 3 clusters, its target from one of them."""
    g = torch.Generator().manual_seed(seed)
    interests = torch.randint(0, CLUSTERS, (batch, 3), generator=g)
    cluster = interests.gather(1, torch.randint(0, 3, (batch, length), generator=g))
    history = (cluster + CLUSTERS * torch.randint(1, ROWS // CLUSTERS, (batch, length), generator=g)).clamp_max(ROWS - 1)
    targets = (interests[:, 0] + CLUSTERS * torch.randint(1, ROWS // CLUSTERS, (batch,), generator=g)).clamp_max(ROWS - 1)
    return targets, history


@pytest.fixture(scope="module")
def table() -> torch.Tensor:
    return clustered_table()


@pytest.fixture(scope="module")
def index(table) -> PQIndex:
    return PQIndex.build(table, SETTINGS)


def recall(approx, exact) -> float:
    hits, total = 0, 0
    for a_pos, a_ok, e_pos, e_ok in zip(approx[1], approx[2], exact[1], exact[2]):
        want = set(e_pos[e_ok].tolist())
        hits += len(want & set(a_pos[a_ok].tolist()))
        total += len(want)
    return hits / total


def test_codes_and_codebooks_have_their_shapes_and_depend_only_on_the_seed(table, index):
    assert index.codes.dtype == torch.uint8 and tuple(index.codes.shape) == (ROWS, M)
    assert index.codebooks.dtype == torch.float32 and tuple(index.codebooks.shape) == (M, 256, D // M)
    assert index.nbytes == ROWS * M + 256 * D * 4
    assert not index.codebooks[:, -1].any() and bool((index.codes[0] == ZERO_CODE).all())  # zero row: zero centroid
    again = PQIndex.build(table, SETTINGS)
    assert torch.equal(again.codes, index.codes) and torch.equal(again.codebooks, index.codebooks)
    other, _ = train_codebooks(table, PQSettings(m=M, sample_rows=ROWS, iterations=15, seed=1))
    assert not torch.equal(other, index.codebooks)
    assert torch.equal(encode(table, index.codebooks), index.codes)
    # the codes reconstruct the unit rows closely (per subspace nearest centroid)
    rows = torch.arange(1, ROWS)
    cos = (index.reconstruct(rows) * unit_rows(table[1:])).sum(1)
    assert float(cos.mean()) > 0.95


def test_recall_at_50_against_the_exact_gsu_on_clustered_data(table, index):
    targets, history = interest_histories(12, 1500, seed=3)
    exact = cosine_topk(table, targets, history, 50)
    estimated = pq_topk(index, table, targets, history, 50)
    recalls = [recall(pq_topk(index, table, targets, history, 50, candidates=c), exact) for c in (100, 200, 400)]
    # a hard case: ~500 behaviors of the target's cluster per history, the top 50 cosines within 0.8..1.0
    assert recall(estimated, exact) >= 0.45 and recalls[-1] >= 0.97
    assert recall(estimated, exact) <= recalls[0] <= recalls[1] <= recalls[2]
    # estimates are close to the exact cosines of the same behaviors
    exact_of_picked = pair_cosine(table, row_norms(table), history.gather(1, estimated[1]).reshape(-1),
                                  targets[:, None].expand(-1, 50).reshape(-1)).view(12, 50)
    assert float((estimated[0] - exact_of_picked).abs().mean()) < 0.05


def test_rescored_scores_are_the_exact_cosines_and_all_candidates_give_cosine_topk(table, index):
    targets, history = interest_histories(5, 300, seed=4)
    history[1, :200] = 0  # left padding
    scores, positions, valid = pq_topk(index, table, targets, history, 20, candidates=60)
    ids = history.gather(1, positions)
    want = pair_cosine(table, row_norms(table), ids[valid], targets[:, None].expand(-1, 20)[valid])
    assert torch.equal(scores[valid], want)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    whole = pq_topk(index, table, targets, history, 20, candidates=300)
    for got, exact in zip(whole, cosine_topk(table, targets, history, 20)):
        assert torch.equal(got, exact)


def test_padding_is_never_selected_and_short_histories_end_invalid(table, index):
    history = torch.zeros(3, 40, dtype=torch.int64)
    history[0] = torch.arange(1, 41)
    history[1, -3:] = torch.tensor([5, 7, 9])
    targets = torch.tensor([3, 4, 5])
    for candidates in (0, 10):
        scores, positions, valid = pq_topk(index, table, targets, history, 6, candidates=candidates)
        assert scores.shape == positions.shape == valid.shape == (3, 6)
        assert scores.dtype == torch.float32 and positions.dtype == torch.int64 and valid.dtype == torch.bool
        assert valid[0].all() and valid[1].tolist() == [True] * 3 + [False] * 3 and not valid[2].any()
        assert set(positions[1, :3].tolist()) == {37, 38, 39}
        assert not bool(scores[~valid].any()) and not bool(positions[~valid].any())
        assert bool((history.gather(1, positions)[valid] != 0).all())


def test_zero_rows_score_zero_and_ties_rank_the_newer_position_first(table):
    zeroed = table.clone()
    zeroed[11] = 0  # an item without content
    index = PQIndex.build(zeroed, SETTINGS)
    history = torch.tensor([[11, 11, 24, 24, 24, 11, 36, 24]])
    scores, positions, valid = pq_topk(index, zeroed, torch.tensor([12]), history, 8)
    assert valid.all()
    by_pos = dict(zip(positions[0].tolist(), scores[0].tolist()))
    assert by_pos[0] == by_pos[1] == by_pos[5] == 0.0
    order = positions[0].tolist()
    for item in (11, 24):  # equal scores (one item): the larger position first
        mine = [p for p in order if int(history[0, p]) == item]
        assert mine == sorted(mine, reverse=True)
    again = pq_topk(index, zeroed, torch.tensor([12]), history, 8)
    assert all(torch.equal(a, b) for a, b in zip(again, (scores, positions, valid)))


def test_shared_histories_are_scored_once_with_the_same_result(table, index):
    targets, users = interest_histories(4, 500, seed=5)
    history = users[torch.tensor([0, 1, 0, 2, 0, 3, 1])]  # samples of one user share its row
    targets = torch.cat([targets, targets[:3]])
    for candidates in (0, 80):
        shared = pq_topk(index, table, targets, history, 30, candidates=candidates)
        alone = pq_topk(index, table, targets, history, 30, candidates=candidates, share_histories=False)
        small_steps = pq_topk(index, table, targets, history, 30, candidates=candidates, chunk_rows=64)
        for a, b, c in zip(shared, alone, small_steps):
            assert torch.equal(a, b) and torch.equal(a, c)
    broadcast = pq_topk(index, table, targets[:3], users[0][None, :].expand(3, -1), 30)
    for a, b in zip(broadcast, pq_topk(index, table, targets[:3], users[0][None, :].repeat(3, 1), 30)):
        assert torch.equal(a, b)


def test_bad_arguments_name_what_is_wrong(table, index):
    targets, history = interest_histories(2, 50, seed=6)
    with pytest.raises(ValueError, match="candidates"):
        pq_topk(index, table, targets, history, 10, candidates=5)
    with pytest.raises(ValueError, match="index"):
        pq_topk(index, table[:100], targets.clamp_max(99), history.clamp_max(99), 10)
    with pytest.raises(ValueError, match="k:"):
        pq_topk(index, table, targets, history, 51)
    with pytest.raises(UserError, match="--m 5: must divide"):
        PQSettings(m=5).check(D)
    with pytest.raises(UserError, match="--centroids 300"):
        PQSettings(m=M, centroids=300).check(D)


def _raw(targets: torch.Tensor, history: torch.Tensor) -> RawBatch:
    b = targets.shape[0]
    cats = (history % 7 + 1) * (history != 0)
    return RawBatch(labels=torch.zeros(b), user_id=torch.arange(1, b + 1), profile=torch.ones(b, 5, dtype=torch.int64),
                    target_item=targets, target_cat=targets % 7 + 1, item_city=torch.ones(b, dtype=torch.int64),
                    item_province=torch.ones(b, dtype=torch.int64), history_items=history, history_cats=cats)


def test_the_stage_runs_the_pq_gsu_builds_a_missing_index_and_pickles(table, index):
    targets, history = interest_histories(4, 120, seed=7)
    history[2, :100] = 0
    cfg = ModelConfig.preset("muse_pq", k=10, pq_m=M, pq_candidates=30)
    stage = GsuStage(cfg, table, pq=index)
    selected = stage.select(_raw(targets, history))
    scores, positions, valid = pq_topk(index, table, targets, history, 10, candidates=30)
    assert torch.equal(selected.gsu_lengths, valid.sum(1))
    assert torch.equal(selected.gsu_item, history.gather(1, positions)[valid])
    assert torch.equal(selected.gsu_scores, torch.where(valid, scores, torch.zeros(())))
    built = GsuStage(cfg, table)  # no file, no index given: built from the table on first use (default settings)
    assert built.pq is None
    built.select(_raw(targets, history))
    assert torch.equal(built.pq.codes, PQIndex.build(table, PQSettings(m=M)).codes)
    copy = pickle.loads(pickle.dumps(stage))
    assert torch.equal(copy.select(_raw(targets, history)).gsu_item, selected.gsu_item)
    # K' >= L: every behavior is re-scored, so the stage's selection is the exact GSU's
    wide = GsuStage(ModelConfig.preset("muse_pq", k=10, pq_m=M, pq_candidates=200), table, pq=index)
    exact = GsuStage(ModelConfig.preset("muse", k=10), table)
    a, b = wide.select(_raw(targets, history)), exact.select(_raw(targets, history))
    assert torch.equal(a.gsu_item, b.gsu_item) and torch.equal(a.gsu_scores, b.gsu_scores)
    with pytest.raises(ValueError, match="does not fit"):
        stage.attach_pq(PQIndex.build(table, PQSettings(m=4)))
    with pytest.raises(ValueError, match="pq_m"):
        ModelConfig.preset("sim_hard", pq_m=8)
    with pytest.raises(ValueError, match="pq_candidates"):
        ModelConfig.preset("muse_pq", k=50, pq_candidates=20)
