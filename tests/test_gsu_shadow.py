"""The int8 filter shadow of bf16/float32 tables (model/gsu/shadow.py) and cosine_topk's prefilter on it: the
quantization bound, the filter never dropping a row that reaches the threshold, exact results on adversarial
near-ties, ties by position, padding, shared histories, the cache and MMTable's precomputed shadow."""

import pickle

import numpy as np
import pytest
import torch

from model.gsu import cosine_topk, pair_cosine
from model.gsu.filter import FilterDots
from model.gsu.shadow import FilterShadow, filter_shadow
from model.gsu.table import MMTable, row_norms
from tests.test_gsu import assert_matches, brute_force, random_history, random_table

FLOATS = (torch.bfloat16, torch.float32)


def near_tie_table(n: int, d: int, center: float, spread: float, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    """Row 1 is the target; rows 2.. have cosines with it within ``spread`` of ``center`` (far below the
    shadow's quantization error), a few rows are peaky (one large entry, which makes the common norm C small)
    and row 0 is padding."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(d, generator=g, dtype=torch.float64)
    unit = target / target.norm()
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    noise -= (noise @ unit)[:, None] * unit[None, :]
    noise /= noise.norm(dim=1, keepdim=True)
    cos = center + spread * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
    rows = cos[:, None] * unit[None, :] + (1 - cos * cos).sqrt()[:, None] * noise
    rows *= 0.5 + torch.rand(n, 1, generator=g, dtype=torch.float64)  # norms vary
    rows[1] = target
    rows[n - 3:, 0] += 40.0  # peaky rows
    table = rows.to(dtype)
    table[0] = 0
    return table


def shadow_dots(shadow: FilterShadow, filters: FilterDots) -> torch.Tensor:
    """int64 [N, B] q_r . q_t of every table row with every target, computed directly."""
    return shadow.rows.long() @ filters.filter_targets.long().t()


@pytest.mark.parametrize("dtype", FLOATS)
def test_shadow_rows_have_the_common_norm_and_bounded_error(dtype):
    table = near_tie_table(300, 16, 0.3, 0.2, 1, dtype)
    table[5] = 0
    shadow = filter_shadow(table)
    values = table.double()
    lengths = values.norm(dim=1, keepdim=True)
    real = lengths[:, 0] > 0
    u = values[real] * (shadow.norm / lengths[real])
    assert u.abs().max() <= 127 + 1e-9  # C keeps every entry within int8
    assert shadow.rows.dtype == torch.int8 and not shadow.rows[~real].any()
    assert (u - shadow.rows[real].double()).abs().max() <= shadow.max_err <= 0.5 + 1e-3
    assert shadow.rows.double().norm(dim=1).max() <= shadow.max_q_norm
    assert torch.equal(filter_shadow(table, row_norms(table).sq_norm).rows, shadow.rows)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_filter_keeps_every_row_reaching_the_threshold(dtype, seed):
    """For thresholds at (and just around) actual row scores, every row whose exact score reaches tau has a
    shadow dot at or above the filter's threshold: the quantization bound is conservative."""
    table = near_tie_table(2000, 32, 0.4, 0.01, seed, dtype)
    g = torch.Generator().manual_seed(seed)
    extra = torch.randn(500, 32, generator=g).to(dtype)  # unrelated rows and targets too
    table = torch.cat([table, extra])
    norms = row_norms(table)
    shadow = filter_shadow(table, norms.sq_norm)
    targets = torch.tensor([1, 2, 2100, 2200])
    filters = FilterDots(table, norms, targets, 1024, shadow)
    dots = shadow_dots(shadow, filters)
    rows = torch.arange(1, table.shape[0])
    dropped_some = False
    for b, target in enumerate(targets.tolist()):
        scores = pair_cosine(table, norms, rows, torch.full_like(rows, target))
        for tau in scores[torch.randperm(rows.shape[0], generator=g)[:40]].tolist() + [-0.9, 0.0, 0.99]:
            need = int(filters.threshold_tensor(filters.thresholds([tau], [b]), torch.int32)[0])
            reach = scores >= tau
            assert bool((dots[1:, b][reach] >= need).all()), (b, tau)
            dropped_some |= bool((dots[1:, b] < need).any())
    assert dropped_some  # the filter does filter


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("center", [0.5, -0.2])
def test_adversarial_near_ties_are_exact(seed, center):
    """Hundreds of rows whose bf16 cosines lie within 1e-3 of each other (far below the quantization error) and
    repeated items (exact ties): the result equals brute force and the unfiltered path bit for bit."""
    table = near_tie_table(600, 64, center, 5e-4, seed)
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(2, 600, (3, 3000), generator=g)
    hist[1, :700] = 0  # left padding
    hist[2, 100:200] = 0  # interior padding
    hist[0, 2990:] = hist[0, 10]  # the same item, newest at 2999
    targets = torch.tensor([1, 1, 1])
    expected = brute_force(table, targets, hist, 50)
    for chunk in (256, 4096):
        got = cosine_topk(table, targets, hist, 50, chunk_rows=chunk, share_histories=False)
        assert_matches(got, expected, 50)
        plain = cosine_topk(table, targets, hist, 50, chunk_rows=chunk, int8_filter=False, share_histories=False)
        assert all(torch.equal(a, b) for a, b in zip(got, plain))


def test_ties_by_position_and_shared_histories_on_the_shadow():
    table = near_tie_table(400, 32, 0.3, 1e-3, 7)
    table[9] = table[4]  # same content, different item
    g = torch.Generator().manual_seed(7)
    users = torch.randint(2, 400, (3, 2000), generator=g)
    users[:, ::37] = 4
    users[:, 5::41] = 9
    users[2, :300] = 0
    hist = users[torch.tensor([0, 1, 0, 2, 0, 1, 2])]
    targets = torch.tensor([1, 4, 1, 2, 9, 1, 3])
    shared = cosine_topk(table, targets, hist, 40, chunk_rows=512)
    alone = cosine_topk(table, targets, hist, 40, chunk_rows=512, share_histories=False)
    assert all(torch.equal(a, b) for a, b in zip(shared, alone))
    assert_matches(shared, brute_force(table, targets, hist, 40), 40)
    scores, positions, valid = shared
    same = [p for p in positions[1].tolist() if int(hist[1, p]) in (4, 9)]
    assert same == sorted(same, reverse=True) and len(same) > 2  # equal scores: larger position first


@pytest.mark.parametrize("dtype", FLOATS)
def test_random_tables_with_padding_match_brute_force(dtype):
    table = random_table(3000, 24, dtype, 3)
    table[17] = 0  # a zero content row: cosine 0
    hist = random_history(6, 2500, 3000, 3)
    hist[2, -5:] = 17
    targets = torch.tensor([1, 2, 17, 4, 5, 6])
    assert_matches(cosine_topk(table, targets, hist, 30, chunk_rows=300), brute_force(table, targets, hist, 30), 30)


def test_shadow_cache_follows_in_place_changes_and_checks_a_given_shadow():
    table = random_table(500, 16, torch.bfloat16, 5)
    hist = random_history(2, 400, 500, 5)
    targets = torch.tensor([3, 4])
    cosine_topk(table, targets, hist, 10)
    table[1:] = -table[1:]  # in place: the cached norms and shadow must be rebuilt
    assert_matches(cosine_topk(table, targets, hist, 10), brute_force(table, targets, hist, 10), 10)
    with pytest.raises(ValueError, match="shadow"):
        cosine_topk(table, targets, hist, 10, shadow=filter_shadow(table[:100]))


def test_mm_table_precomputes_and_shares_the_shadow(tmp_path):
    array = np.random.default_rng(0).integers(-127, 128, size=(60, 16), dtype=np.int8)
    array[0] = 0
    np.save(tmp_path / "t.npy", array)
    mm = MMTable.load(str(tmp_path / "t.npy"), dtype="bfloat16")
    assert mm.shadow is not None and torch.equal(mm.shadow.rows, filter_shadow(mm.table).rows)
    assert mm.shadow.rows.is_shared()
    again = pickle.loads(pickle.dumps(mm))
    assert again.shadow is not None and torch.equal(again.shadow.rows, mm.shadow.rows)
    assert MMTable.load(str(tmp_path / "t.npy"), dtype="bfloat16", int8_filter=False).shadow is None
    assert MMTable.load(str(tmp_path / "t.npy")).shadow is None  # int8 tables filter on themselves
    hist = torch.randint(1, 60, (3, 40), generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([1, 2, 3])
    with_shadow = cosine_topk(mm.table, targets, hist, 10, norms=mm.norms, shadow=mm.shadow)
    assert_matches(with_shadow, brute_force(mm.table, targets, hist, 10), 10)
