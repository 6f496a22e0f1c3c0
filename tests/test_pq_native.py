"""The approximate GSU's two scans (model/gsu/pq_scan.py): the native C scan (model/gsu/pq_native.py) and the
torch ``embedding_bag`` fallback give identical ``pq_topk`` results (scores, positions, valid) with and without
re-scoring, on ties, padding, zero rows, shared histories and odd lengths; the C scan keeps exactly the top K'
rank keys of the subspace-ordered float32 sums; its re-scoring dots are the exact integers; kernel selection
offers only the torch scan where no compiler exists."""

import pytest
import torch

from model.gsu import PQIndex, PQSettings, cosine_topk, kernels, pq_native, pq_topk
from model.gsu.pq_scan import NativeScan, TorchScan, native_luts
from model.gsu.ranking import NO_KEY, rank_keys

NATIVE = pq_native.library() is not None
needs_native = pytest.mark.skipif(not NATIVE, reason="no C compiler here: " + pq_native.unavailable_reason())
D, CLUSTERS, ROWS = 48, 10, 2500


def clustered(seed: int) -> torch.Tensor:
    """int8 [ROWS, D]: row i in cluster i % CLUSTERS, a few all-zero rows (items without content), row 0 padding."""
    g = torch.Generator().manual_seed(seed)
    centroids = torch.nn.functional.normalize(torch.randn(CLUSTERS, D, generator=g), dim=1)
    x = centroids[torch.arange(ROWS) % CLUSTERS] + 0.7 * torch.randn(ROWS, D, generator=g) / D ** 0.5
    table = torch.trunc(x.clamp(-1, 1) * 127).to(torch.int8)
    table[0] = 0
    table[[17, 18, 400]] = 0
    return table


@pytest.fixture(scope="module", params=[8, 12])  # M = 12: subspaces of 4 values, M not a multiple of 8
def case(request):
    table = clustered(request.param)
    return table, PQIndex.build(table, PQSettings(m=request.param, sample_rows=ROWS, iterations=8, seed=1))


def histories(length: int, seed: int) -> tuple:
    """(targets [B], histories [B, L]) with: a long unique history, left padding, an all-padding row, a row of
    repeated items (tied estimates and cosines), zero-content items, and 3 + 40 samples sharing two rows (the 40
    span two of the C scan's blocks of 32 targets)."""
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(1, ROWS, (6, length), generator=g)
    users[1, : length // 3] = 0
    users[2] = 0
    users[3] = torch.tensor([5, 15, 25, 5, 15])[torch.arange(length) % 5]
    users[4, ::7] = 17
    owner = torch.tensor([0, 1, 2, 3, 4, 5, 5, 5] + [0] * 40)
    targets = torch.randint(1, ROWS, (owner.shape[0],), generator=g)
    targets[3] = 18  # a zero target: every estimate and cosine 0, ties everywhere
    return targets, users[owner]


def scan_with(monkeypatch, name: str, *args, **kwargs):
    monkeypatch.setenv(kernels.ENV_VAR, f"pq_scan={name}")
    assert kernels.pq_scan_kernel(args[0].m).name == name
    return pq_topk(*args, **kwargs)


@needs_native
@pytest.mark.parametrize("length", [1003, 64])
@pytest.mark.parametrize("candidates", [0, 30, 400])
def test_native_and_torch_scans_give_identical_results(monkeypatch, case, length, candidates):
    table, index = case
    targets, history = histories(length, length + candidates)
    k = 10
    candidates = min(candidates, length) if candidates else 0
    torch_out = scan_with(monkeypatch, "torch", index, table, targets, history, k, candidates=candidates, chunk_rows=512)
    native_out = scan_with(monkeypatch, "native", index, table, targets, history, k, candidates=candidates)
    for a, b in zip(torch_out, native_out):
        assert torch.equal(a, b)
    scores, positions, valid = native_out
    assert not valid[2].any() and not bool((history.gather(1, positions)[valid] == 0).any())  # padding never selected
    ties = positions[3][valid[3]].tolist()  # target 18 is a zero row: all scores 0, the newest positions first
    assert ties == sorted(ties, reverse=True) and ties[0] == length - 1 and not bool(scores[3].any())
    if candidates == length:  # every behavior re-scored: the exact GSU's result
        for a, b in zip(native_out, cosine_topk(table, targets, history, k)):
            assert torch.equal(a, b)


@needs_native
def test_broadcast_histories_give_the_same_results_under_both_scans(monkeypatch, case):
    table, index = case
    targets, history = histories(300, 9)
    row = history[0]
    outs = [scan_with(monkeypatch, name, index, table, targets[:37], row[None, :].expand(37, -1), 20, candidates=60)
            for name in ("torch", "native")]
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def reference_keys(codes: torch.Tensor, lut: torch.Tensor, ids: torch.Tensor, width: int) -> torch.Tensor:
    """int64 [G, width] sorted descending: the top keys of the estimates summed in float32 subspace by subspace
    (lut [M * 256, G]), clamped, padding excluded; NO_KEY past the non-padding count."""
    m = codes.shape[1]
    est = torch.zeros(ids.shape[0], lut.shape[1])
    for j in range(m):
        est = est + lut[j * 256 + codes[ids, j].long()]
    est = est.clamp(-1.0, 1.0) + 0.0
    keys = rank_keys(est.t().contiguous(), torch.arange(ids.shape[0]).expand(lut.shape[1], -1))
    keys[:, ids == 0] = NO_KEY
    top = torch.sort(keys, dim=1, descending=True).values[:, :width]
    return torch.cat([top, torch.full((lut.shape[1], width - top.shape[1]), NO_KEY)], 1)


@needs_native
@pytest.mark.parametrize("m,length,targets,width,values", [
    (16, 5003, 1, 100, "random"), (16, 5003, 1, 1, "random"), (8, 777, 3, 50, "random"), (16, 300, 2, 1000, "random"),
    (16, 4000, 1, 64, "zero"), (12, 2001, 5, 64, "coarse"), (16, 3001, 40, 7, "random"), (4, 9, 1, 9, "random")])
def test_the_c_scan_keeps_the_top_keys_of_subspace_ordered_sums(m, length, targets, width, values):
    """Random float tables (the summation order matters), all-zero tables (every estimate ties: keys ascend
    with the position, the running threshold's worst case), coarse values (ties and clamping), K' = 1, K' > L."""
    g = torch.Generator().manual_seed(m * length + targets)
    codes = torch.randint(0, 256, (20000, m), dtype=torch.uint8, generator=g)
    ids = torch.randint(0, codes.shape[0], (length,), generator=g)
    ids[::11] = 0
    lut = {"random": torch.randn(m * 256, targets, generator=g) * 0.2, "zero": torch.zeros(m * 256, targets),
           "coarse": torch.randint(-3, 4, (m * 256, targets), generator=g).float() / 8}[values]
    out = torch.empty(targets, width, dtype=torch.int64)
    group, starts = torch.arange(targets), torch.tensor([0, targets])
    assert pq_native.scan(codes, ids[None, :], lut.t().contiguous(), group, starts, out) == -1
    assert torch.equal(torch.sort(out, dim=1, descending=True).values, reference_keys(codes, lut, ids, width))


@needs_native
def test_the_native_lookup_tables_put_every_code_at_m_times_256():
    """native_luts moves entry (m, c) to m * 256 + c; fewer than 256 centroids leave the unused codes at zero."""
    g = torch.Generator().manual_seed(3)
    luts = torch.randn(3, 4 * 200, generator=g)  # B = 3 targets, M = 4, C = 200
    out = native_luts(luts, 4)
    assert out.shape == (3, 4 * 256) and out.is_contiguous()
    assert torch.equal(out.view(3, 4, 256)[:, :, :200].reshape(3, -1), luts)
    assert not bool(out.view(3, 4, 256)[:, :, 200:].any())


def test_groups_of_one_and_many_samples_in_one_call_match_their_scans_alone():
    """One C call for groups of 1, 3 and 35 samples (2 blocks of 32 targets) = each sample scanned on its own."""
    if not NATIVE:
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(8)
    codes = torch.randint(0, 256, (3000, 16), dtype=torch.uint8, generator=g)
    rows = torch.randint(1, 3000, (3, 501), generator=g)
    owner = torch.tensor([0] + [1] * 3 + [2] * 35)
    history = rows[owner]
    luts = torch.randn(owner.shape[0], 16 * 256, generator=g) * 0.1
    groups = [[0], [1, 2, 3], list(range(4, 39))]
    members = torch.tensor([b for group in groups for b in group])
    together = torch.empty(owner.shape[0], 40, dtype=torch.int64)
    assert pq_native.scan(codes, rows, luts, members, torch.tensor([0, 1, 4, 39]), together) == -1
    for b in range(owner.shape[0]):
        alone = torch.empty(1, 40, dtype=torch.int64)
        assert pq_native.scan(codes, history[b:b + 1], luts[b:b + 1].contiguous(), torch.tensor([0]), torch.tensor([0, 1]), alone) == -1
        assert torch.equal(torch.sort(together[b]).values, torch.sort(alone[0]).values)


@needs_native
@pytest.mark.parametrize("width", [128, 130, 7])
def test_the_native_rescoring_dots_are_the_exact_integers(width):
    g = torch.Generator().manual_seed(width)
    table = torch.randint(-128, 128, (500, width), dtype=torch.int8, generator=g)
    table[1], table[2] = -128, 127
    ids = torch.randint(0, 500, (6, 70), generator=g)
    ids[0, :3] = torch.tensor([1, 2, 0])
    targets = torch.tensor([1, 2, 3, 4, 0, 1])
    want = (table[ids].long() * table[targets].long()[:, None, :]).sum(-1).double()
    for scan in (NativeScan(), TorchScan()):
        if width <= kernels.FLOAT32_EXACT_WIDTH:
            assert torch.equal(scan.rescore_dots(table, ids, targets), want), scan.name


@pytest.mark.parametrize("name", ["torch", "native"])
def test_an_id_outside_the_table_is_a_value_error_naming_history_ids(monkeypatch, case, name):
    if name == "native" and not NATIVE:
        pytest.skip("no C compiler here")
    table, index = case
    targets, history = histories(200, 4)
    history[0, 150] = table.shape[0]
    monkeypatch.setenv(kernels.ENV_VAR, f"pq_scan={name}")
    with pytest.raises(ValueError, match="history_ids"):
        pq_topk(index, table, targets, history, 10, candidates=20)


def test_without_a_compiler_only_the_torch_scan_is_offered_and_runs(monkeypatch, tmp_path, case):
    table, index = case
    targets, history = histories(200, 5)
    monkeypatch.setattr(pq_native, "LIBRARY", pq_native.LIBRARY.fresh())
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(kernels, "_MEASURED", {})
    monkeypatch.setattr(kernels, "_CHOICES", {})
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    choice = kernels.choose(kernels.PQ_SCAN, index.m)
    assert choice.name == "torch" and "no-such-cc" in choice.excluded["native"] and "M=" in choice.describe()
    monkeypatch.setenv(kernels.ENV_VAR, "pq_scan=native")  # forced but unavailable: the measured choice runs
    forced = kernels.choose(kernels.PQ_SCAN, index.m)
    assert forced.name == "torch" and not forced.forced and "native" in forced.note
    scores, positions, valid = pq_topk(index, table, targets, history, 10, candidates=30)
    assert valid[0].all() and not valid[2].any()


def test_the_scan_choice_is_measured_and_names_a_checked_kernel(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    choice = kernels.choose(kernels.PQ_SCAN, 16)
    offered = {"torch"} | ({"native"} if NATIVE else set())
    assert set(choice.times_ms) == offered and not choice.excluded.get("torch")
    assert choice.name == min(choice.times_ms, key=choice.times_ms.get) and not choice.forced
    assert kernels.parse_override("pq_scan=torch") == {kernels.PQ_SCAN: "torch"}
