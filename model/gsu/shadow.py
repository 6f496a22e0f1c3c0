"""The int8 filter shadow of a bfloat16 (or float32) multimodal table: the same rows quantized to int8, read by
the GSU's conservative prefilter instead of the wider rows (128 B instead of 256 B per bf16 row of 128), with a
bound on the quantization error that the filter folds into its threshold (``model.gsu.filter``). Only the few
rows that pass are read again from the table itself and scored exactly, so results do not change.

Quantization. Every non-zero row r is scaled to the same norm C: u_r = r * C / |r|, q_r = round(u_r) (int8), so
|u_r| = C for every non-zero row and the filter needs no per-row norm. C = 127 * min_r |r| / max|r| (over the
non-zero rows, a hair smaller) keeps every |u_r| entry within 127. ``max_err`` = max over rows and entries of
|u_r - q_r| (<= 1/2, measured), ``max_q_norm`` = max_r |q_r|.

Memory: N x D int8, half a bf16 table (a quarter of a float32 one), plus nothing per row.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch

_CHUNK_ROWS = 1 << 15
# Relative margin on C (so rounding never takes a u_r entry past 127 by more than the clamp measures).
_SCALE_MARGIN = 2.0 ** -30
# Absolute margin on the measured entry error: u_r is computed in float32 from a float64 factor C / |r|, so each
# computed entry is within 127 * 3 * 2**-24 < 2.3e-5 of the real one (bf16 and float32 entries are exact in
# float32 and the factor is rounded once, the product once).
_ERR_MARGIN = 1e-4


@dataclass(frozen=True)
class FilterShadow:
    """rows: int8 [N, D], q_r above (zeros for zero rows); norm: C, the norm of every non-zero u_r;
    max_err: bound on every |u_r - q_r| entry; max_q_norm: bound on every |q_r|."""

    rows: torch.Tensor
    norm: float
    max_err: float
    max_q_norm: float

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0])

    def share_memory_(self) -> "FilterShadow":
        self.rows.share_memory_()
        return self


def filter_shadow(table: torch.Tensor, sq_norm: Optional[torch.Tensor] = None,
                  chunk_rows: int = _CHUNK_ROWS) -> FilterShadow:
    """The ``FilterShadow`` of a 2-D bfloat16/float32 table [N, D], ``chunk_rows`` rows at a time (two passes:
    the common norm C, then the rows and their measured errors). sq_norm: optional float64 [N] squared row norms
    (``RowNorms.sq_norm``), computed here otherwise."""
    if table.dim() != 2 or table.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"table: expected a 2-D bfloat16/float32 tensor, got {table.dtype} {tuple(table.shape)}")
    n, width = table.shape
    if sq_norm is None or sq_norm.dtype != torch.float64 or sq_norm.shape != (n,):
        sq_norm = torch.cat([table[i:i + chunk_rows].double().square().sum(1) for i in range(0, n, chunk_rows)]) \
            if n else torch.zeros(0, dtype=torch.float64)
    ratio = math.inf
    for start in range(0, n, chunk_rows):
        peak = table[start:start + chunk_rows].abs().amax(1).double()
        real = peak > 0
        if bool(real.any()):
            ratio = min(ratio, float((sq_norm[start:start + chunk_rows].sqrt() / peak)[real].min()))
    if ratio == math.inf:  # every row is zero
        return FilterShadow(torch.zeros(n, width, dtype=torch.int8), 127.0, 0.0, 0.0)
    norm = 127.0 * ratio * (1.0 - _SCALE_MARGIN)
    out = torch.empty(n, width, dtype=torch.int8)
    max_err, max_sq = 0.0, 0.0
    for start in range(0, n, chunk_rows):
        rows = table[start:start + chunk_rows].float()
        lengths = sq_norm[start:start + rows.shape[0], None].sqrt()
        factor = (norm / torch.where(lengths > 0, lengths, torch.ones_like(lengths))).float()
        scaled = rows * factor
        quant = scaled.round().clamp_(-127, 127)
        out[start:start + rows.shape[0]] = quant.to(torch.int8)
        max_err = max(max_err, float((scaled - quant).abs().max()))
        max_sq = max(max_sq, float(torch.sum(quant.square(), 1, dtype=torch.float64).max()))  # integers: exact
    return FilterShadow(out, norm, max_err + _ERR_MARGIN, math.sqrt(max_sq) * (1.0 + 1e-12))
