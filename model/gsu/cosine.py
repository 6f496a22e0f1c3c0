"""Exact cosines of given (behavior, target) pairs, computed exactly as ``cosine_topk`` scores them, so a pair
gets the same float32 score wherever it occurs (top-k, recent behaviors, whole-history scores)."""

from typing import Optional

import torch

from model.gsu import kernels
from model.gsu.inputs import chunk_rows_for
from model.gsu.table import RowNorms


def exact_dots(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float64 [...] dot products over the last dim of ``rows`` and ``targets`` (broadcastable, table dtype), one
    pair at a time with the same operations wherever the pair occurs, so equal pairs always get equal scores.
    int8: the exact integer dots, by the kernel measured fastest on the host (``model.gsu.kernels``: int16
    products summed in int32, or float32 products and sums, exact for D <= 1024), so every kernel gives the same
    value; bf16: summed in float32, where its products are exact so only the sum rounds (~1e-7 relative);
    float32: multiplied and summed in float64."""
    if rows.dtype == torch.int8:
        return kernels.dots_kernel(rows.shape[-1]).dots(rows, targets)
    work = torch.float64 if rows.dtype == torch.float32 else torch.float32
    return (rows.to(work) * targets.to(work)).sum(-1).double()


def cosines(dots: torch.Tensor, sq_items: torch.Tensor, sq_targets: torch.Tensor) -> torch.Tensor:
    """float32 [n] = fl32(dot / sqrt(|r|^2 |t|^2)) computed in float64; dots float64 [n]. A zero row has dot 0 and
    gets +0.0 (the clamp only keeps 0 / 0 away, genuine products are far above it; + 0.0 turns -0.0 into +0.0,
    so every zero score has the same rank key)."""
    return (dots / (sq_items.double() * sq_targets.double()).clamp_min(1e-300).sqrt()).to(torch.float32) + 0.0


def pair_cosine(table: torch.Tensor, norms: RowNorms, item_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """float32 [n] cosine(table[item_ids[i]], table[target_ids[i]]), bit-identical to the score ``cosine_topk``
    gives the same pair; 0 where either row is zero. item_ids, target_ids: int64 [n]."""
    items, targets = table.index_select(0, item_ids), table.index_select(0, target_ids)
    return cosines(exact_dots(items, targets), norms.sq_norm.index_select(0, item_ids),
                   norms.sq_norm.index_select(0, target_ids))


def cross_cosines(table: torch.Tensor, norms: RowNorms, item_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """float32 [C, n]: ``pair_cosine`` of every (target, item) pair, target_ids int64 [C], item_ids int64 [n],
    bit-identical to it. Where int8 dots are exact in float32 (``kernels.float32_exact``) one float32 product gives
    the exact integer dots and ``cosines`` the same formula; other tables take ``pair_cosine`` itself."""
    c, n = target_ids.shape[0], item_ids.shape[0]
    if not kernels.float32_exact(table):
        return pair_cosine(table, norms, item_ids.repeat(c), target_ids.repeat_interleave(n)).view(c, n)
    dots = torch.mm(table.index_select(0, target_ids).to(torch.float32), table.index_select(0, item_ids).to(torch.float32).t())
    return cosines(dots.double(), norms.sq_norm.index_select(0, item_ids)[None, :],
                   norms.sq_norm.index_select(0, target_ids)[:, None])


def history_cosines(table: torch.Tensor, norms: RowNorms, target_ids: torch.Tensor, history_ids: torch.Tensor,
                    chunk_rows: Optional[int] = None) -> torch.Tensor:
    """float32 [B, L]: cosine of every history position with its sample's target (0 at padding), computed
    about ``chunk_rows`` behaviors at a time. target_ids int64 [B]; history_ids int64 [B, L]."""
    chunk_rows = chunk_rows_for(table, chunk_rows)
    batch, length = history_ids.shape
    out = torch.zeros(batch, length, dtype=torch.float32)
    rows = max(1, chunk_rows // max(1, length))
    cols = min(length, chunk_rows)
    for b0 in range(0, batch, rows):
        for s in range(0, length, max(1, cols)):
            hist = history_ids[b0:b0 + rows, s:s + cols]
            mask = hist != 0
            if bool(mask.any()):
                targets = target_ids[b0:b0 + rows, None].expand_as(hist)[mask]
                out[b0:b0 + rows, s:s + cols][mask] = pair_cosine(table, norms, hist[mask], targets)
    return out
