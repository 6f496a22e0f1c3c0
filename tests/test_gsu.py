"""cosine_topk (model/gsu/__init__.py) against a float64 brute force: dtypes, padding, ties, short histories, zero rows,
chunk boundaries, shared histories, bad arguments."""

import pytest
import torch

from model.gsu import cosine_topk, kernels, pair_cosine, topk
from model.gsu.topk import BLOCK_DOTS, MAX_PACKED, MAX_SHARED, blocks, history_groups
from model.gsu.table import row_norms

DTYPES = (torch.int8, torch.bfloat16, torch.float32)


def random_table(n: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        table = torch.randint(-127, 128, (n, d), dtype=torch.int8, generator=g)
    else:
        table = torch.randn(n, d, generator=g).to(dtype)
    table[0] = 0
    return table


def random_history(batch: int, length: int, n: int, seed: int) -> torch.Tensor:
    """Left-padded histories of random lengths (sample 0 full, one sample empty) with a few interior zeros."""
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(1, n, (batch, length), generator=g)
    starts = torch.randint(0, length, (batch,), generator=g)
    starts[0] = 0
    if batch > 1:
        starts[-1] = length
    hist = hist * (torch.arange(length)[None, :] >= starts[:, None])
    holes = torch.rand(batch, length, generator=g) < 0.05
    return hist.masked_fill(holes, 0)


def brute_force(table: torch.Tensor, target_ids: torch.Tensor, history_ids: torch.Tensor, k: int):
    """float64 cosines on the float table (int8 / 127), sorted by (score desc, position desc), padding dropped."""
    values = table.to(torch.float64) / (127.0 if table.dtype == torch.int8 else 1.0)
    norm = (values * values).sum(1).sqrt()
    out = []
    for b in range(history_ids.shape[0]):
        hist = history_ids[b]
        dots = (values[hist] * values[target_ids[b]]).sum(1)
        den = norm[hist] * norm[target_ids[b]]
        cos = torch.where(den > 0, dots / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
        ranked = sorted(((float(cos[p]), p) for p in range(hist.shape[0]) if hist[p] != 0), key=lambda x: (-x[0], -x[1]))
        out.append(ranked[:k])
    return out


def assert_matches(result, expected, k: int, atol: float = 1e-6) -> None:
    scores, positions, valid = result
    assert scores.dtype == torch.float32 and positions.dtype == torch.int64 and valid.dtype == torch.bool
    assert scores.shape == positions.shape == valid.shape == (len(expected), k)
    for b, ranked in enumerate(expected):
        n = len(ranked)
        assert valid[b].tolist() == [True] * n + [False] * (k - n), b
        assert positions[b, :n].tolist() == [p for _, p in ranked], b
        assert torch.allclose(scores[b, :n].double(), torch.tensor([s for s, _ in ranked], dtype=torch.float64), atol=atol, rtol=0)
        assert not scores[b, n:].any() and not positions[b, n:].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_float64_brute_force(dtype, seed):
    table = random_table(300, 16, dtype, seed)
    hist = random_history(5, 257, 300, seed)
    targets = torch.randint(0, 300, (5,), generator=torch.Generator().manual_seed(seed))
    assert_matches(cosine_topk(table, targets, hist, 20, chunk_rows=64), brute_force(table, targets, hist, 20), 20)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_history_through_the_running_threshold(dtype):
    """Many chunks after the top k is full: the dot-product filter must never drop a true top-k row."""
    table = random_table(5000, 32, dtype, 3)
    hist = random_history(3, 6000, 5000, 3)
    targets = torch.tensor([1, 2, 3])
    assert_matches(cosine_topk(table, targets, hist, 50, chunk_rows=512), brute_force(table, targets, hist, 50), 50)


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_sizes_gather_long_pieces_in_several_blocks(dtype):
    """D = 128 and the default chunk: pieces longer than one gather (model.gsu.inputs.GATHER_BYTES of rows) are
    gathered and filtered block by block, for packed single histories and for a shared one."""
    table = random_table(3000, 128, dtype, 13)
    users = random_history(3, 9000, 3000, 13)
    hist = users[torch.tensor([0, 1, 2, 1, 1])]
    targets = torch.tensor([5, 6, 7, 8, 9])
    assert_matches(cosine_topk(table, targets, hist, 30), brute_force(table, targets, hist, 30), 30)
    hist[2, 4000] = 3000  # outside the table, deep inside a long piece
    with pytest.raises(ValueError, match="history_ids"):
        cosine_topk(table, targets, hist, 30)


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_exact_ties_at_the_running_threshold(dtype):
    """Rows of +-1 all have the same norm, so the filter bound is tight and cosines take only D + 1 values:
    thousands of rows tie with the k-th best, and only the most recent of them may be kept."""
    g = torch.Generator().manual_seed(12)
    table = (torch.randint(0, 2, (500, 8), generator=g) * 2 - 1).to(dtype)
    table[0] = 0
    hist = random_history(3, 4000, 500, 12)
    targets = torch.tensor([1, 2, 3])
    assert_matches(cosine_topk(table, targets, hist, 50, chunk_rows=256), brute_force(table, targets, hist, 50), 50)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 2, 5])
def test_narrow_tables(dtype, width):
    table = random_table(40, width, dtype, width)
    hist = random_history(4, 30, 40, width)
    targets = torch.tensor([1, 5, 0, 7])
    assert_matches(cosine_topk(table, targets, hist, 9, chunk_rows=8), brute_force(table, targets, hist, 9), 9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_rank_the_more_recent_position_first(dtype):
    table = random_table(20, 8, dtype, 4)
    table[7] = table[3]  # a second item with the same content: same cosine as item 3
    hist = torch.tensor([[3, 5, 3, 7, 9, 3, 5, 7, 0, 3]])
    scores, positions, valid = cosine_topk(table, torch.tensor([11]), hist, 10, chunk_rows=3)
    assert valid[0].tolist() == [True] * 9 + [False]
    order = positions[0, :9].tolist()
    same = [p for p in order if int(hist[0, p]) in (3, 7)]
    assert same == [9, 7, 5, 3, 2, 0]  # equal scores: larger position first
    assert sorted(order) == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    assert len({float(scores[0, order.index(p)]) for p in same}) == 1


def test_k_larger_than_the_valid_history():
    table = random_table(50, 8, torch.int8, 5)
    hist = torch.zeros(2, 12, dtype=torch.int64)
    hist[0, -3:] = torch.tensor([4, 9, 4])
    scores, positions, valid = cosine_topk(table, torch.tensor([2, 3]), hist, 10)
    assert valid[0].tolist() == [True] * 3 + [False] * 7
    assert not valid[1].any() and not scores[1].any() and not positions[1].any()  # all padding: nothing selected
    assert sorted(positions[0, :3].tolist()) == [9, 10, 11]
    assert_matches((scores, positions, valid), brute_force(table, torch.tensor([2, 3]), hist, 10), 10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_content_rows_have_cosine_zero(dtype):
    table = random_table(30, 8, dtype, 6)
    table[5] = 0  # a real item without an embedding
    hist = torch.tensor([[5, 1, 2, 5], [0, 1, 2, 3]])
    scores, positions, valid = cosine_topk(table, torch.tensor([1, 5]), hist, 4)
    row0 = dict(zip(positions[0].tolist(), scores[0].tolist()))
    assert valid[0].all() and row0[0] == 0.0 and row0[3] == 0.0
    assert positions[0].tolist().index(3) < positions[0].tolist().index(0)  # tie at 0: more recent first
    # A zero target: every cosine is 0, so the most recent behaviors win.
    assert scores[1, :3].tolist() == [0.0, 0.0, 0.0] and positions[1, :3].tolist() == [3, 2, 1] and not valid[1, 3]
    assert not torch.isnan(scores).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunk_size_never_changes_the_result(dtype):
    table = random_table(200, 12, dtype, 7)
    hist = random_history(4, 131, 200, 7)
    targets = torch.tensor([3, 4, 5, 6])
    expected = cosine_topk(table, targets, hist, 17, chunk_rows=1 << 15)
    for chunk in (1, 7, 17, 64, 130, 131, 132):
        for got, want in zip(cosine_topk(table, targets, hist, 17, chunk_rows=chunk), expected):
            assert torch.equal(got, want), chunk
    assert_matches(expected, brute_force(table, targets, hist, 17), 17)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [40, 3000])
def test_shared_histories_equal_the_per_sample_path(dtype, length):
    """Samples of one user share a history row: scoring it once for all their targets changes nothing."""
    table = random_table(400, 16, dtype, 8)
    users = random_history(3, length, 400, 8)
    user_of_sample = torch.tensor([0, 1, 0, 2, 0, 1, 1, 0, 2, 0, 0, 1])
    hist = users[user_of_sample].clone()
    hist[11, -1] = 0 if hist[11, -1] != 0 else 5  # same probe positions as user 1 but a different row
    targets = torch.randint(0, 400, (12,), generator=torch.Generator().manual_seed(8))
    shared = cosine_topk(table, targets, hist, 20, chunk_rows=256)
    alone = cosine_topk(table, targets, hist, 20, chunk_rows=256, share_histories=False)
    for a, b in zip(shared, alone):
        assert torch.equal(a, b)
    singles = [cosine_topk(table, targets[i:i + 1], hist[i:i + 1], 20) for i in range(12)]
    for i, single in enumerate(singles):
        for a, b in zip(single, shared):
            assert torch.equal(a[0], b[i]), i
    assert_matches(shared, brute_force(table, targets, hist, 20), 20, atol=1e-5)
    if length == 40:  # short pieces pack shared groups and single samples into one block
        packed = blocks(history_groups(hist), length, 256, 4096)
        assert len(packed) == 1 and sorted(len(g) for g in packed[0]) == [1, 2, 3, 6]


def test_blocks_respect_their_limits():
    """Short histories are packed up to MAX_PACKED histories, MAX_SHARED samples, chunk_rows rows and BLOCK_DOTS
    products; histories of a whole gather or more get a block each; no group is split or lost."""
    singles = [[i] for i in range(40)]
    assert [len(b) for b in blocks(singles, 100, 32768, 4096)] == [MAX_PACKED, MAX_PACKED, 40 - 2 * MAX_PACKED]
    assert [len(b) for b in blocks(singles, 100, 250, 4096)] == [2] * 20  # chunk_rows: 2 x 100 rows
    assert [len(b) for b in blocks(singles[:3], 4096, 32768, 4096)] == [1, 1, 1]
    shared = [list(range(i * 30, i * 30 + 30)) for i in range(3)]
    assert [len(b) for b in blocks(shared, 10, 32768, 4096)] == [2, 1]  # 60 samples, then 30
    wide = blocks(singles, 4000, 32768, 4096)
    for block in wide:
        assert len(block) * 4000 * (len(block) + 7) <= BLOCK_DOTS or len(block) == 1
    assert sum(wide, []) == singles


def test_a_broadcast_history_is_one_group_and_scores_like_per_sample():
    """rank() passes one history expanded to every candidate (stride 0): grouped without row comparisons,
    results equal to scoring each candidate alone."""
    table = random_table(300, 16, torch.int8, 11)
    history = random_history(1, 500, 300, 11)[0]
    count = MAX_SHARED + 5
    expanded = history[None, :].expand(count, -1)
    groups = history_groups(expanded)
    assert [len(g) for g in groups] == [MAX_SHARED, 5] and sorted(sum(groups, [])) == list(range(count))
    targets = torch.randint(1, 300, (count,), generator=torch.Generator().manual_seed(11))
    shared = cosine_topk(table, targets, expanded, 20)
    alone = cosine_topk(table, targets, expanded.contiguous(), 20, share_histories=False)
    for a, b in zip(shared, alone):
        assert torch.equal(a, b)


def test_precomputed_norms_and_in_place_changes():
    table = random_table(100, 8, torch.int8, 9)
    hist = random_history(3, 50, 100, 9)
    targets = torch.tensor([1, 2, 3])
    plain = cosine_topk(table, targets, hist, 5)
    given = cosine_topk(table, targets, hist, 5, norms=row_norms(table))
    assert all(torch.equal(a, b) for a, b in zip(plain, given))
    table[hist[0, -1]] = table[1]  # the newest behavior of sample 0 becomes identical to its target
    scores, positions, _ = cosine_topk(table, targets, hist, 5)
    assert positions[0, 0] == 49 and scores[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_scores_equal_pair_cosine_bit_for_bit():
    for dtype in DTYPES:
        table = random_table(100, 16, dtype, 10)
        hist = random_history(2, 60, 100, 10)
        targets = torch.tensor([4, 8])
        scores, positions, valid = cosine_topk(table, targets, hist, 10)
        items = hist.gather(1, positions)[valid]
        again = pair_cosine(table, row_norms(table), items, targets[:, None].expand_as(positions)[valid])
        assert torch.equal(scores[valid], again)


def test_int8_means_value_over_127():
    table = random_table(80, 16, torch.int8, 11)
    hist = random_history(3, 40, 80, 11)
    targets = torch.tensor([1, 2, 3])
    a = cosine_topk(table, targets, hist, 8)
    b = cosine_topk(table.to(torch.float32) / 127, targets, hist, 8)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert torch.allclose(a[0], b[0], atol=1e-6)


GOOD = dict(table=torch.zeros(10, 4, dtype=torch.int8), target_ids=torch.tensor([1, 2]),
            history_ids=torch.tensor([[1, 2, 3], [0, 4, 5]]), k=2)


@pytest.mark.parametrize("change, argument", [
    ({"table": torch.zeros(10, dtype=torch.int8)}, "table"),
    ({"table": torch.zeros(10, 4, 2, dtype=torch.int8)}, "table"),
    ({"table": torch.zeros(10, 0, dtype=torch.int8)}, "table"),
    ({"table": torch.zeros(10, 4, dtype=torch.int32)}, "table"),
    ({"target_ids": torch.tensor([1, 10])}, "target_ids"),
    ({"target_ids": torch.tensor([-1, 2])}, "target_ids"),
    ({"history_ids": torch.tensor([[1, 2, 3], [0, 4, 10]])}, "history_ids"),
    ({"history_ids": torch.tensor([[1, -2, 3], [0, 4, 5]])}, "history_ids"),
    ({"history_ids": torch.tensor([1, 2, 3])}, "history_ids"),
    ({"history_ids": torch.tensor([[1, 2, 3]])}, "history_ids"),
    ({"target_ids": torch.tensor([1.0, 2.0])}, "target_ids"),
    ({"k": 0}, "k"),
    ({"k": -3}, "k"),
    ({"k": 4}, "k"),
    ({"k": 2.0}, "k"),
    ({"target_ids": torch.zeros(0, dtype=torch.int64), "history_ids": torch.zeros(0, 3, dtype=torch.int64)}, "target_ids"),
])
def test_bad_arguments_raise_value_error_naming_them(change, argument):
    with pytest.raises(ValueError, match=argument):
        cosine_topk(**{**GOOD, **change})


def test_bad_norms_and_chunk_rows():
    with pytest.raises(ValueError, match="norms"):
        cosine_topk(**GOOD, norms=row_norms(torch.zeros(11, 4, dtype=torch.int8)))
    with pytest.raises(ValueError, match="chunk_rows"):
        cosine_topk(**GOOD, chunk_rows=0)


def _without_native_select(monkeypatch) -> None:
    """The dense top-K's selection in torch ops, as on a host without a C compiler."""
    from model.gsu import cbuild, dense_select

    monkeypatch.setattr(dense_select, "LIBRARY", cbuild.Library.absent("test: no compiler"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 7, 40])
@pytest.mark.parametrize("dense", ["native", "float32", "torch", False])
def test_a_broadcast_history_scores_each_distinct_item_once_with_the_same_result(dtype, k, dense, monkeypatch):
    """One history shared by every target (serving's rank()), full of repeats, padding and holes, with distinct
    items of identical content (exact ties across items): the distinct-item path equals scoring each sample
    alone, ties ranked by position; k above an item's count and above the number of distinct items included.
    int8 tables score few distinct items densely (``_dense_topk``) or, past DENSE_ITEMS, by the streaming filter."""
    if not dense:
        monkeypatch.setattr(topk, "DENSE_ITEMS", 0)
    if dense in ("native", "float32"):  # either dense kernel (C int32 sums, or torch.mm and the C selection)
        monkeypatch.setenv(kernels.ENV_VAR, f"dense={dense}")
    if dense == "torch":
        _without_native_select(monkeypatch)
    table = random_table(60, 16, dtype, 12)
    table[31:41] = table[1:11]  # items 31..40 tie exactly with items 1..10
    g = torch.Generator().manual_seed(12)
    history = torch.randint(1, 41, (3000,), generator=g)
    history[:200] = 0
    history[torch.randint(200, 3000, (50,), generator=g)] = 0
    history[2990:] = torch.arange(50, 60)  # ten items seen once, newest
    targets = torch.randint(1, 60, (9,), generator=g)
    shared = cosine_topk(table, targets, history[None, :].expand(9, -1), k)
    alone = cosine_topk(table, targets, history[None, :].repeat(9, 1), k, share_histories=False)
    for a, b in zip(shared, alone):
        assert torch.equal(a, b)
    few = torch.zeros(300, dtype=torch.int64)
    few[[5, 50, 250]] = torch.tensor([3, 3, 33])  # 3 real behaviors, 2 distinct items (tied content)
    for hist in (few, torch.zeros(300, dtype=torch.int64)):  # and no real behavior at all
        shared = cosine_topk(table, targets, hist[None, :].expand(9, -1), k)
        alone = cosine_topk(table, targets, hist[None, :].repeat(9, 1), k, share_histories=False)
        for a, b in zip(shared, alone):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kernel", ["native", "float32", "torch"])
def test_dense_broadcast_scoring_keeps_near_ties_and_zero_rows_exact(kernel, monkeypatch):
    """Items whose rows are multiples of one another (equal cosines up to rounding: the dense prefilter's bound
    must keep every one that can tie), zero rows and negative scores: the dense path equals the streaming one,
    with the dots and selection in one C call, with torch.mm and the selection in C (``model.gsu.dense_select``),
    and all in torch ops."""
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-40, 41, (40, 32), generator=g, dtype=torch.int8)
    table = torch.cat([torch.zeros(1, 32, dtype=torch.int8), base, base * 2, base * 3,
                       torch.zeros(5, 32, dtype=torch.int8), -base])  # rows 121..125 zero
    history = torch.randint(1, table.shape[0], (2000,), generator=g)
    targets = torch.randint(1, table.shape[0], (70,), generator=g)
    for k, sample in ((1, 4096), (5, 4096), (50, 4096), (1, 8), (5, 16), (50, 50)):
        if kernel == "torch":
            _without_native_select(monkeypatch)
        else:
            monkeypatch.setenv(kernels.ENV_VAR, f"dense={kernel}")
        monkeypatch.setattr(topk, "DENSE_SAMPLE", sample)  # small samples: the bound from every stride-th item
        dense = cosine_topk(table, targets, history[None, :].expand(70, -1), k)
        monkeypatch.setattr(topk, "DENSE_ITEMS", 0)
        streamed = cosine_topk(table, targets, history[None, :].expand(70, -1), k)
        monkeypatch.undo()
        for a, b in zip(dense, streamed):
            assert torch.equal(a, b), k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [-1, 100])
def test_broadcast_history_with_bad_id_raises_value_error(dtype, bad):
    """One history shared by every candidate by ``.expand`` (serving; the dense path on int8 tables): an id
    outside the table is a ValueError naming history_ids, as on the other paths, not an IndexError."""
    table = random_table(100, 128, dtype, 5)
    history = torch.randint(1, 100, (300,))
    history[7] = bad
    with pytest.raises(ValueError, match="history_ids"):
        cosine_topk(table, torch.arange(1, 6), history[None, :].expand(5, -1), 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_is_never_selected_when_the_tables_row_0_is_not_zero(dtype):
    """history id 0 is padding whatever the table's row 0 holds: a non-zero row 0 whose dot with the target
    passes a later piece's (positive) threshold is still dropped."""
    torch.manual_seed(1)
    base = torch.randint(-128, 128, (400, 256), dtype=torch.int8)
    table = base[:, :128].contiguous().to(dtype)
    targets = torch.randint(0, 400, (6,))
    history = torch.randint(0, 400, (6, 500))
    history[:, ::5] = 0
    for k in (6, 9, 20):
        _, positions, valid = cosine_topk(table, targets, history, k)
        assert not bool(((history.gather(1, positions) == 0) & valid).any())


def test_native_dense_selection_gives_the_torch_selection_keys_bit_for_bit():
    """model.gsu.dense_select.select_keys against topk._select_keys on integer dots with many exact and near ties,
    zero rows (inverse 0, score 0) and a bound from every stride-th item; its argument checks."""
    from model.gsu import dense_select

    if dense_select.LIBRARY.function("muse_dense_select") is None:
        pytest.skip(f"no native kernel here: {dense_select.LIBRARY.reason()}")
    g = torch.Generator().manual_seed(8)
    c, u = 37, 301
    rows = torch.randint(-9, 10, (u, 8), generator=g).to(torch.float32)
    rows[::7] = rows[1::7][: rows[::7].shape[0]] * 2  # proportional rows: equal cosines up to rounding
    rows[5:9] = 0
    targets = torch.randint(-9, 10, (c, 8), generator=g).to(torch.float32)
    dots = targets @ rows.t()
    sq_items, sq_targets = (rows * rows).sum(1), (targets * targets).sum(1)
    inverse = torch.where(sq_items > 0, 1.0 / sq_items.double().clamp_min(1.0).sqrt(), torch.zeros((), dtype=torch.float64))
    inverse = inverse.to(torch.float32)
    for k, stride in ((1, 1), (10, 1), (10, 30), (50, 6), (u, 1)):
        native = dense_select.select_keys(dots, inverse, sq_items, sq_targets, k, stride)
        assert torch.equal(native, topk._select_keys(dots, inverse[None, :], sq_items, sq_targets, k, stride)), (k, stride)
    with pytest.raises(ValueError, match="not a valid selection"):
        dense_select.select_keys(dots, inverse, sq_items, sq_targets, 50, 10)  # 31 sampled items < k
    with pytest.raises(ValueError, match="not a valid selection"):
        dense_select.select_keys(dots.t(), inverse, sq_items, sq_targets, 5, 1)


def test_native_dense_topk_takes_the_dots_itself_with_the_same_keys():
    """dense_select.topk_i8 (int32 dots of a few targets at a time, selected in the same call) against
    select_keys of the float32 product, bit for bit: items with -128 and 127, targets within [-127, 127] (the
    maddubs loop) and with -128 (the madd loop), repeated and zero rows, a last partial group of targets and an odd
    item count (the vector loops' tails), D = 48 (madd only) and D = 40 (plain C); and its argument checks."""
    from model.gsu import dense_select

    if dense_select.LIBRARY.function("muse_dense_topk_i8") is None:
        pytest.skip(f"no native kernel here: {dense_select.LIBRARY.reason()}")
    g = torch.Generator().manual_seed(21)
    for c, u, d, low in ((1, 1, 16, -128), (6, 301, 128, -127), (6, 301, 128, -128), (9, 1000, 40, -128),
                         (4, 2, 32, -127), (5, 77, 48, -127)):
        targets = torch.randint(low, 128, (c, d), generator=g, dtype=torch.int8)
        if low == -128:
            targets[-1, 3] = -128
        items = torch.randint(-128, 128, (u, d), generator=g, dtype=torch.int8)
        items[::5] = items[u // 2].clone()
        items[-1], targets[0] = -128, 127
        if u > 3:
            items[1:3] = 0
        sq_items, sq_targets = (items.double() ** 2).sum(1), (targets.double() ** 2).sum(1)
        inverse = torch.where(sq_items > 0, 1.0 / sq_items.clamp_min(1.0).sqrt(), torch.zeros((), dtype=torch.float64))
        inverse = inverse.to(torch.float32)
        for k, stride in ((1, 1), (min(u, 10), 1), (min(u, 10), max(1, u // 10)), (u, 1)):
            want = dense_select.select_keys(targets.float() @ items.float().t(), inverse, sq_items, sq_targets, k, stride)
            got = dense_select.topk_i8(targets, items, inverse, sq_items, sq_targets, k, stride)
            assert torch.equal(got, want), (c, u, d, k, stride)
    with pytest.raises(ValueError, match="not a valid selection"):
        dense_select.topk_i8(targets.float(), items, inverse, sq_items, sq_targets, 1, 1)
    with pytest.raises(ValueError, match="not a valid selection"):
        dense_select.topk_i8(targets, items[:, :8], inverse, sq_items, sq_targets, 1, 1)


def test_native_occurrence_keys_with_every_item_tied_equal_the_torch_keys(monkeypatch):
    """Candidates without content (zero rows: cosine 0 with every item, so all of a history's items tie) and k far
    above an item's occurrences: the C occurrence expansion (running top-k, then a sort) equals the torch one."""
    from model.gsu import cbuild, dense_select

    if dense_select.LIBRARY.function("muse_occurrence_keys") is None:
        pytest.skip(f"no native kernel here: {dense_select.LIBRARY.reason()}")
    g = torch.Generator().manual_seed(5)
    table = torch.randint(-127, 128, (400, 32), generator=g, dtype=torch.int8)
    table[300:] = 0  # items 300..399 without content
    history = torch.randint(1, 120, (3000,), generator=g)
    targets = torch.cat([torch.arange(300, 306), torch.arange(1, 4)])  # six without content, three with
    for k in (1, 50, 119, 600):
        native = cosine_topk(table, targets, history[None, :].expand(9, -1), k)
        with monkeypatch.context() as patch:
            patch.setattr(dense_select, "LIBRARY", cbuild.Library.absent("test: torch ops"))
            reference = cosine_topk(table, targets, history[None, :].expand(9, -1), k)
        for a, b in zip(native, reference):
            assert torch.equal(a, b), k


def test_dense_kernels_refuse_a_bad_stride_or_short_norms():
    from model.gsu import dense_select

    if dense_select.LIBRARY.function("muse_dense_topk_i8") is None:
        pytest.skip(f"no native kernel here: {dense_select.LIBRARY.reason()}")
    targets, items = torch.ones(2, 16, dtype=torch.int8), torch.ones(5, 16, dtype=torch.int8)
    inverse, sq_items, sq_targets = torch.ones(5), torch.ones(5, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    for bad in ({"stride": 0}, {"stride": -1}, {"inverse": inverse[:3]}, {"sq_items": sq_items[:4]},
                {"sq_targets": sq_targets[:1]}):
        args = {"inverse": inverse, "sq_items": sq_items, "sq_targets": sq_targets, "k": 1, "stride": 1, **bad}
        with pytest.raises(ValueError, match="not a valid selection"):
            dense_select.topk_i8(targets, items, **args)
        with pytest.raises(ValueError, match="not a valid selection"):
            dense_select.select_keys(torch.ones(2, 5), **args)


def test_the_dense_kernel_is_measured_and_can_be_forced(monkeypatch):
    """The dense op's choice: every candidate exact at D = 128 is timed on the probe (agreeing with the float64
    reference), the fastest runs; MUSE_GSU_KERNEL=dense=float32 forces the other."""
    choice = kernels.choose(kernels.DENSE, 128)
    assert set(choice.times_ms) | set(choice.excluded) == {"float32", "native"}
    assert choice.name == min(choice.times_ms, key=choice.times_ms.get) and "float32" in choice.times_ms
    monkeypatch.setenv(kernels.ENV_VAR, "dense=float32")
    forced = kernels.choose(kernels.DENSE, 128)
    assert forced.name == "float32" and forced.forced
    assert kernels.parse_override("dense=native") == {kernels.DENSE: "native"}


def test_native_dense_selection_on_degenerate_rows_equal_to_torch():
    """Rows whose estimates all tie, or differ by a few ulps of a large value (the histogram's bins would be finer
    than float32 can place), or are all zero: the native selection still gives the torch keys."""
    from model.gsu import dense_select

    if dense_select.LIBRARY.function("muse_dense_select") is None:
        pytest.skip(f"no native kernel here: {dense_select.LIBRARY.reason()}")
    u = 90
    dots = torch.stack([torch.full((u,), 7.0), 1e6 + torch.arange(u, dtype=torch.float32) % 3, torch.zeros(u),
                        torch.arange(u, dtype=torch.float32) - 45])
    sq_items, sq_targets = torch.full((u,), 4.0), torch.tensor([9.0, 1e12, 0.0, 16.0])
    inverse = torch.full((u,), 0.5)
    for k in (1, 20, u):
        native = dense_select.select_keys(dots, inverse, sq_items, sq_targets, k, 1)
        assert torch.equal(native, topk._select_keys(dots, inverse[None, :], sq_items, sq_targets, k, 1)), k
