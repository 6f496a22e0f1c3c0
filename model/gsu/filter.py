"""The prefilter of ``cosine_topk``: dot products of gathered history rows with their targets in the table's
own precision, and the smallest such dot a row needs to possibly reach a sample's running k-th score.

The filter dot is exact for int8 (int8 x int8 -> the exact integer, by the kernel ``model.gsu.kernels`` measured
fastest on the host: ``torch._int_mm`` with int32 out, float32 ``torch.mm`` of converted rows, which is exact
for these widths (the dots then are float32 integers), or the native C loop that gathers and dots in one pass,
int32 out). For bf16/float32 tables it is
either the exact dot of the rows' int8 shadow with the target quantized the same way (``model.gsu.shadow``,
the default: half the bytes gathered of a bf16 row), within the quantization bound derived in
``_shadow_need``, or a matmul in the table's dtype (float32 accumulation), within the _FILTER_* allowances.
With the torch kernels, rows are gathered ``gather_rows`` at a time into one reused buffer that stays in L2 (``model.gsu.inputs.GATHER_BYTES``), and
each gathered block is multiplied at once, before the next gather evicts it; only the dot products
(a few bytes per row and target) are kept for the whole piece. A block of several short histories is multiplied
against all of its samples' targets in one product (the per-op cost dominates there), and the caller keeps each
history's own columns.
"""

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from model.gsu import kernels
from model.gsu.inputs import gather, gather_rows_for
from model.gsu.shadow import FilterShadow
from model.gsu.table import RowNorms

_INT32_MIN, _INT32_MAX = torch.iinfo(torch.int32).min, torch.iinfo(torch.int32).max
# Thresholds of float32 filter dots are clamped to +-this: an even float32 just past every exact dot (<= 2**24).
_FLOAT_DOT_LIMIT = 2 ** 24 + 2
# Rounding allowances of the float filters (see thresholds): bf16 output rounding is <= 2**-8 relative,
# float32 accumulation over D <= 128 terms is far below 2**-10 of |t| |r|.
_FILTER_REL = 2.0 ** -6
_FILTER_ABS = 2.0 ** -10
_SCORE_SLACK = 2.0 ** -20  # float64 rounding of the norms and the division, far below float32's
# Margin on a shadow threshold for the float64 arithmetic that computes it (its terms are below 2**24).
_SHADOW_MARGIN = 1e-9


# Blocks of at least this many targets take the "filter_wide" kernel (model.gsu.kernels): there the product,
# not the gather, bounds the time.
WIDE_FROM = 9


class _Product:
    """One filter kernel's reused state: kernel (None: torch.mm in the table's dtype), the dtype of its dots, its
    gather buffer (none for a kernel that gathers itself), its workspace and a flat scratch for its dots."""

    def __init__(self, kernel: Optional[kernels.FilterKernel], filter_table: torch.Tensor, gather_rows: int):
        self.kernel = kernel
        self.dot_dtype = kernel.out_dtype if kernel is not None else filter_table.dtype
        width = filter_table.shape[1]
        gathers = kernel is not None and kernel.gathers
        self.buffer = torch.empty(0 if gathers else gather_rows, width, dtype=filter_table.dtype)
        self.work = kernel.workspace(gather_rows, width) if kernel is not None else None
        self.scratch = torch.empty(0, dtype=self.dot_dtype)


class FilterDots:
    """Filter dot products and thresholds for the targets of one ``cosine_topk`` call.

    table [N, D], norms its RowNorms, target_ids int64 [B]; shadow: the int8 ``FilterShadow`` of a bf16/float32
    table to filter on, or None (filter on the table itself); chunk_rows bounds the rows of one call of
    ``block_dots`` (and so the scratch memory: chunk_rows x columns dot products).
    """

    def __init__(self, table: torch.Tensor, norms: RowNorms, target_ids: torch.Tensor, chunk_rows: int,
                 shadow: Optional[FilterShadow] = None):
        self.table = table
        self.norms = norms
        self.exact_int = table.dtype == torch.int8  # filter dots are the exact dots
        self.shadow = None if self.exact_int else shadow
        self.int_filter = self.exact_int or self.shadow is not None  # filter dots are exact integers
        self.filter_table = table if self.shadow is None else self.shadow.rows  # the rows the filter gathers
        self.targets = table.index_select(0, target_ids)  # [B, D], table dtype
        self.sq_t = norms.sq_norm.index_select(0, target_ids).double()  # [B]
        self.inv_t = [1.0 / math.sqrt(v) if v > 0 else 0.0 for v in self.sq_t.tolist()]
        self.inv_min, self.inv_max = 1.0 / norms.max_norm, 1.0 / norms.min_norm
        self.filter_targets = self.targets if self.shadow is None else self._quantized_targets()
        self.gather_rows = gather_rows_for(self.filter_table, chunk_rows)
        self._products: Dict[bool, _Product] = {}
        self._columns: Dict[Tuple[int, ...], torch.Tensor] = {}

    def product(self, count: int) -> _Product:
        """The kernel and state for a block of ``count`` targets: the int8 product's kernel for that regime,
        measured once per process (model.gsu.kernels; never _int_mm at D = 1, where it is wrong on CPU in torch
        2.13), whose dots are exact integers (int32 or float32); torch.mm in the table's dtype without a shadow."""
        wide = count >= WIDE_FROM
        if wide not in self._products:
            kernel = kernels.filter_kernel(self.table.shape[1], wide) if self.int_filter else None
            self._products[wide] = _Product(kernel, self.filter_table, self.gather_rows)
        return self._products[wide]

    def columns(self, samples: List[int]) -> torch.Tensor:
        """Targets of ``samples`` as a [D, G'] matrix as the block's kernel takes it (int8 filters: G' = G, or G
        rounded up to a multiple of 8 with zero columns for ``_int_mm``; float32 for the float32 kernel).
        Cached: a sample's columns are reused per piece."""
        key = tuple(samples)
        if key not in self._columns:
            kernel = self.product(len(samples)).kernel
            columns = self.filter_targets[samples].t()
            self._columns[key] = kernel.columns(columns) if kernel is not None else columns.contiguous()
        return self._columns[key]

    def block_dots(self, ids: torch.Tensor, samples: List[int]) -> torch.Tensor:
        """[R, S] filter dots of the rows ``ids`` [R] (the histories of a block, one after another) with the targets
        of the block's S ``samples``; the caller keeps the (row, sample) pairs where the row is in the sample's
        history. Rows are gathered ``gather_rows`` at a time and each gather multiplied at once, before the next
        evicts it from L2 (or all at once by a kernel that gathers itself)."""
        product = self.product(len(samples))
        columns = self.columns(samples)
        size = ids.shape[0] * columns.shape[1]
        if product.scratch.numel() < size:  # grown as needed, never shrunk
            product.scratch = torch.empty(size, dtype=product.dot_dtype)
        out = product.scratch[:size].view(ids.shape[0], columns.shape[1])
        self._dots_into(product, ids, columns, out)
        return out[:, : len(samples)]

    def _dots_into(self, product: _Product, ids: torch.Tensor, columns: torch.Tensor, out: torch.Tensor) -> None:
        """out [R, G'] = rows ``ids`` [R] x columns [D, G'] by ``product``'s kernel."""
        kernel = product.kernel
        if kernel is not None and kernel.gathers:
            if kernel.gather_mm(self.filter_table, ids, columns, out) >= 0:
                gather(self.table, ids)  # raises the ValueError naming history_ids
            return
        if ids.shape[0] <= self.gather_rows:
            self._mm(product, gather(self.filter_table, ids, product.buffer), columns, out)
            return
        try:
            for part, part_out in zip(ids.split(self.gather_rows), out.split(self.gather_rows)):
                rows = torch.index_select(self.filter_table, 0, part, out=product.buffer[: part.shape[0]])
                self._mm(product, rows, columns, part_out)
        except IndexError:
            gather(self.table, ids)  # raises the ValueError naming history_ids

    @staticmethod
    def _mm(product: _Product, rows: torch.Tensor, columns: torch.Tensor, out: torch.Tensor) -> None:
        """out [R, G'] = rows [R, D] x columns [D, G'] in the filter's precision (int8: the exact integers)."""
        if product.kernel is not None:
            product.kernel.mm(rows, columns, out, product.work)
        else:
            torch.mm(rows, columns, out=out)

    def thresholds(self, taus: List[float], samples: List[int]) -> List[float]:
        """Per sample, the smallest filter dot a row needs for its exact score to possibly reach tau.

        score = fl32(d / (|r| |t|)) >= tau implies d * inv_r * inv_t >= tau' = tau - slack, and inv_r = 1 / |r|
        lies in [inv_min, inv_max] for non-zero rows, so d >= tau' / (inv_max * inv_t) when tau' > 0 and
        d >= tau' / (inv_min * inv_t) otherwise (a zero row has d = 0 and score 0, consistent with both).
        """
        out = []
        for tau, sample in zip(taus, samples):
            if tau == -math.inf:
                out.append(-math.inf)
                continue
            low = tau - abs(tau) * _SCORE_SLACK - 1e-40
            inv_t = self.inv_t[sample]
            if inv_t == 0.0:  # a zero target scores 0 against every row: all rows or none
                out.append(-math.inf if low <= 0 else math.inf)
                continue
            if self.shadow is not None:
                out.append(self._shadow_need(low, sample))
                continue
            need = low / ((self.inv_max if low > 0 else self.inv_min) * inv_t)
            if not self.exact_int:
                need -= _FILTER_ABS / (inv_t * self.inv_min)
                need = need / (1 + _FILTER_REL) if need >= 0 else need / (1 - _FILTER_REL)
            out.append(need)
        return out

    def threshold_tensor(self, needs: List[float], dot_dtype: torch.dtype) -> torch.Tensor:
        """[G] thresholds in the filter dots' dtype ``dot_dtype`` (the block's kernel's), rounded down: for int
        filters the integer floor(need) - 1 clamped to int32, as int32 or, for float32 dots (|dot| <= 2**24,
        ``model.gsu.kernels``), clamped further to +-(2**24 + 2), float32 integers that every dot compares with as
        with the int32 threshold (none reaches one above 2**24, all reach one below -2**24); float32 otherwise."""
        if self.int_filter:
            ints = [_INT32_MIN if n == -math.inf else _INT32_MAX if n == math.inf
                    else max(_INT32_MIN, min(_INT32_MAX, math.floor(n) - 1)) for n in needs]
            if dot_dtype == torch.int32:
                return torch.tensor(ints, dtype=torch.int32)
            return torch.tensor([max(-_FLOAT_DOT_LIMIT, min(_FLOAT_DOT_LIMIT, n)) for n in ints], dtype=torch.float32)
        return torch.tensor([_float32_at_most(n) for n in needs], dtype=torch.float32)


    def _quantized_targets(self) -> torch.Tensor:
        """int8 [B, D] q_t = round(u_t), u_t = t * 127 / max|t| (float64), and per target the float64 constants of
        ``_shadow_need``: |u_t|, ||u_t||_1 and |u_t - q_t|."""
        values = self.targets.double()
        peak = values.abs().amax(1, keepdim=True)
        scaled = values * (127.0 / torch.where(peak > 0, peak, torch.ones_like(peak)))
        quant = scaled.round().clamp(-127, 127)
        self.u_norm = scaled.norm(dim=1).tolist()
        self.u_l1 = scaled.abs().sum(1).tolist()
        self.u_err = (scaled - quant).norm(dim=1).tolist()
        return quant.to(torch.int8)

    def _shadow_need(self, low: float, sample: int) -> float:
        """The smallest shadow dot q_r . q_t a row r needs for its exact score to possibly reach tau (low: tau less
        the score's float rounding, see thresholds), for a non-zero target t.

        With u_r = r * C / |r| (|u_r| = C for every non-zero row, ``model.gsu.shadow``) and u_t = t * 127 / max|t|,
        cos(r, t) = u_r . u_t / (C |u_t|) and, exactly,
            u_r . u_t = q_r . q_t + q_r . (u_t - q_t) + (u_r - q_r) . u_t,
        where |q_r . (u_t - q_t)| <= |q_r| |u_t - q_t| <= max_q_norm |u_t - q_t| (Cauchy-Schwarz) and
        |(u_r - q_r) . u_t| <= max_err ||u_t||_1 (each |u_r - q_r| entry <= max_err). So cos >= low implies
            q_r . q_t >= low C |u_t| - max_q_norm |u_t - q_t| - max_err ||u_t||_1.
        The exact score sums the bf16 products in float32 (``exact_dots``): its dot differs from r . t by at most
        (D - 1) 2**-24 sum|r_i t_i| <= D 2**-24 |r| |t|, so the cosine bound is lowered by 2 D 2**-24 first.
        A zero row has q_r . q_t = 0 and score 0, consistent with the bound. The result is lowered by a margin
        for its own float64 rounding, then rounded down to an integer by ``threshold_tensor``.
        """
        shadow = self.shadow
        low -= 2.0 * self.table.shape[1] * 2.0 ** -24
        need = (low * shadow.norm * self.u_norm[sample] - shadow.max_q_norm * self.u_err[sample]
                - shadow.max_err * self.u_l1[sample])
        return need - abs(need) * _SHADOW_MARGIN - 1.0


def _float32_at_most(value: float) -> float:
    """The largest float32 <= value (value may be +-inf)."""
    rounded = np.float32(value)
    if float(rounded) > value:
        rounded = np.nextafter(rounded, np.float32(-np.inf))
    return float(rounded)
