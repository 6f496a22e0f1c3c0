"""model.esu_native: the ESU's C kernels against the torch ops they replace."""

import pytest
import torch

from model import esu_native
from model.attention import TargetAttention
from model.gsu import cbuild
from model.simtier import SimTier, tier_counts, tiers_of

pytestmark = pytest.mark.skipif(esu_native.LIBRARY.function("muse_esu_attend") is None,
                                reason=f"no native kernel here: {esu_native.LIBRARY.reason()}")


def _torch_only(monkeypatch) -> None:
    monkeypatch.setattr(esu_native, "LIBRARY", cbuild.Library.absent("test: torch ops"))


@pytest.mark.parametrize("projections", [False, True])
@pytest.mark.parametrize("kind", ["sata", "sata-no-temperature", "ta"])
def test_attention_by_index_in_c_equals_the_torch_path(projections, kind, monkeypatch):
    """TargetAttention.forward_shared with the C pass equals its torch ops (float32 rounding), for TA, SA-TA with
    and without the temperature, with and without projections: slots of -1, a row without any behavior (zeros),
    repeated behaviors, gates away from 1."""
    torch.manual_seed(3)
    attention = TargetAttention(32, 16, kind != "ta", r_temperature=0.1 if kind == "sata" else None,
                                projections=projections).eval()
    if attention.gates is not None:
        with torch.no_grad():
            attention.gates.copy_(torch.tensor([0.7, 1.3, -0.4]))
    b, k, u = 37, 11, 9
    query, distinct = torch.randn(b, 32), torch.randn(u, 32)
    index = torch.randint(-1, u, (b, k))
    index[5] = -1
    mask, similarity = index >= 0, torch.rand(b, k) * 2 - 1
    with torch.no_grad():
        native = attention.forward_shared(query, distinct, index, mask, similarity)
        _torch_only(monkeypatch)
        reference = attention.forward_shared(query, distinct, index, mask, similarity)
    assert torch.allclose(native, reference, rtol=1e-5, atol=1e-6)
    assert torch.equal(native[5], torch.zeros(32))


def test_attention_where_every_valid_logit_is_minus_infinity_pools_as_torch_does(monkeypatch):
    """SA-TA logits of -inf on every valid slot (huge gates, a tiny temperature): a row with a masked slot pools to
    zeros, as masked_softmax's lowest-value fill makes it; a row without one is NaN in both."""
    attention = TargetAttention(8, 8, True, r_temperature=1e-30).eval()
    with torch.no_grad():
        attention.gates.copy_(torch.tensor([1.0, 1e10, 0.0]))
    index = torch.tensor([[0, 1, -1], [0, 1, 2]])
    args = (torch.randn(2, 8), torch.randn(3, 8), index, index >= 0, -torch.ones(2, 3))
    with torch.no_grad():
        native = attention.forward_shared(*args)
        _torch_only(monkeypatch)
        reference = attention.forward_shared(*args)
    assert torch.equal(native[0], torch.zeros(8)) and torch.equal(reference[0], torch.zeros(8))
    assert bool(native[1].isnan().all()) and bool(reference[1].isnan().all())


def test_attention_keeps_the_torch_path_where_a_gradient_is_needed():
    """In training (gradients on) the C pass is not taken: the result carries a gradient."""
    attention = TargetAttention(8, 8, True, r_temperature=0.1)
    pooled = attention.forward_shared(torch.randn(4, 8), torch.randn(3, 8), torch.randint(0, 3, (4, 5)),
                                      torch.ones(4, 5, dtype=torch.bool), torch.rand(4, 5))
    assert pooled.requires_grad
    assert esu_native.attend(torch.randn(4, 8, requires_grad=True), torch.randn(3, 8), torch.randn(3, 8),
                             torch.zeros(4, 5, dtype=torch.int64), None, None, 1.0) is None


def test_attention_index_outside_the_behaviors_is_an_index_error():
    with pytest.raises(IndexError, match="behavior 3 of 3"):
        esu_native.attend(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 4), torch.tensor([[0, 3]]).expand(2, 2),
                          None, None, 1.0)


def test_tier_counts_in_c_equal_bucketize_counts():
    """Every tier edge exactly, values just below and above each edge, beyond [-1, 1], NaN and +-inf, masked
    scores not counted: the C counts equal the torch counts and bucketize's tiers."""
    width, tiers = 0.1, 20
    edges = (-1.0 + torch.arange(0, tiers + 1, dtype=torch.float64) * width).to(torch.float32)
    around = torch.cat([edges, torch.nextafter(edges, torch.tensor(-2.0)), torch.nextafter(edges, torch.tensor(2.0))])
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -3.0, 3.0, 0.0, -0.0])
    scores = torch.cat([around, special, torch.rand(40) * 2.4 - 1.2])[None, :].repeat(3, 1)
    mask = torch.rand(scores.shape, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[0] = True
    got = tier_counts(scores, mask, tiers, width)
    buckets = torch.bucketize(scores, edges[1:-1], right=True)
    want = torch.zeros(3, tiers).scatter_add_(1, buckets, mask.float())
    assert torch.equal(got, want)
    assert torch.equal(tiers_of(scores, tiers, width), buckets)


def test_simtier_features_with_and_without_the_kernel_are_equal(monkeypatch):
    simtier = SimTier(20, 0.1, 8)
    scores, mask = torch.rand(16, 50) * 2 - 1, torch.rand(16, 50) > 0.5
    native = simtier(scores, mask)
    _torch_only(monkeypatch)
    assert torch.equal(native, simtier(scores, mask))
