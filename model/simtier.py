"""SimTier: a histogram of multimodal cosines over equal-width tiers of [-1, 1], embedded per tier.

Tier t covers [edge_t, edge_{t+1}) with edge_t = float32(-1 + t * width) (the last tier also holds 1.0;
values below -1 or above 1 fall in the first/last tier). Padding is not counted.
Features: log1p(count_t) * v_t for a learned vector v_t per tier, flattened to [B, T * tier_dim].
"""

import functools

import torch
from torch import nn

from model import esu_native
from model.columns import Tiers


def tier_edges(num_tiers: int, width: float, device: torch.device | None = None) -> torch.Tensor:
    """The T - 1 inner tier edges, float32 [T - 1]: -1 + t * width for t = 1..T-1, computed in float64."""
    steps = torch.arange(1, num_tiers, dtype=torch.float64, device=device)
    return (-1.0 + steps * width).to(torch.float32)


def tiers_of(scores: torch.Tensor, num_tiers: int, width: float) -> torch.Tensor:
    """The tier of each score, int64, same shape: ``torch.bucketize(scores, tier_edges(...), right=True)`` computed
    as floor((s + 1) / width), clamped, then moved by one tier where that guess falls on the wrong side of an edge
    (float32 rounding can put it one tier off, never more): a few elementwise passes instead of a binary search
    per element, the same tiers (NaN and +inf in the last, as
    bucketize puts them)."""
    bounds = tier_bounds(num_tiers, width, scores.device)
    s = torch.nan_to_num(scores.float(), nan=torch.inf)  # bucketize puts NaN, like +inf, in the last tier
    guess = torch.floor((s + 1.0) * (1.0 / width)).clamp_(0, num_tiers - 1).to(torch.int64)
    guess -= (s < _lookup(bounds, guess)).to(torch.int64)
    guess += (s >= _lookup(bounds, guess + 1)).to(torch.int64)
    return guess.clamp_(max=num_tiers - 1)  # +inf >= bounds[T] = inf


@functools.lru_cache(maxsize=16)
def tier_bounds(num_tiers: int, width: float, device: torch.device | None = None) -> torch.Tensor:
    """float32 [T + 1]: -inf, the inner edges, +inf; tier t covers [bounds[t], bounds[t + 1]). Built once per
    (T, width, device) and shared (every SimTier call of a rank or a train step reads it; never written)."""
    with torch.inference_mode(False):  # a normal tensor even when first built under inference mode (serving)
        inf = torch.full((1,), torch.inf, device=device)
        return torch.cat([-inf, tier_edges(num_tiers, width, device), inf])


def _lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a 1-D table, through index_select (no generic advanced-indexing kernel)."""
    return table.index_select(0, index.reshape(-1)).view(index.shape)


def tier_counts(scores: torch.Tensor, mask: torch.Tensor, num_tiers: int, width: float) -> torch.Tensor:
    """Number of valid scores per tier: scores float [B, N], mask bool [B, N] -> float32 [B, T] (one C loop where
    ``esu_native`` builds, the same counts)."""
    counts = esu_native.tier_counts(scores, mask, tier_bounds(num_tiers, width, scores.device), width)
    if counts is not None:
        return counts
    tiers = tiers_of(scores, num_tiers, width)
    counts = torch.zeros(scores.shape[0], num_tiers, dtype=torch.float32, device=scores.device)
    return counts.scatter_add_(1, tiers, mask.to(torch.float32))


class SimTier(nn.Module):
    """scores [B, N], mask [B, N] -> features [B, num_tiers * tier_dim]."""

    def __init__(self, num_tiers: int, width: float, tier_dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.num_tiers = num_tiers
        self.width = width
        self.tier_vectors = nn.Parameter(torch.empty(num_tiers, tier_dim, device=device))
        self.reset_parameters()

    @property
    def out_dim(self) -> int:
        return self.tier_vectors.numel()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.tier_vectors, std=0.1)

    def forward(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.columns(scores, mask).expanded(scores.shape[0])

    def columns(self, scores: torch.Tensor, mask: torch.Tensor) -> Tiers:
        """The features as ``Tiers`` (log1p of the counts [B, T] and the tier vectors), for a caller that folds them
        into the next layer (``model.columns``)."""
        return Tiers(torch.log1p(tier_counts(scores, mask, self.num_tiers, self.width)), self.tier_vectors)
