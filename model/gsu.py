"""General search unit: exact cosine top-K of a target item against a user's whole behavior history in the
frozen multimodal table, and ``GsuStage``, the input-pipeline stage that turns a ``RawBatch`` into a ``Batch``.

``cosine_topk`` streams the history in chunks of positions, newest first, so memory stays bounded by the
chunk whatever L is (no float [B, L, D] tensor ever exists). Per chunk it gathers the table rows of the
chunk's ids (``index_select``: the cost floor), takes their dot products with the target row in the table's
own precision (int8 x int8 -> int32 with ``torch._int_mm``, exact; bf16/f32 with a matmul whose rounding is
bounded), and keeps only rows whose dot product could still reach the running K-th best cosine: the bound
uses the smallest norm of any table row, so no row that belongs in the top K is dropped. Those few
candidates get their cosine (dot / sqrt(|r|^2 |t|^2) in float64 from the stored squared norms, rounded to
float32) and are merged into the running top K once per chunk. Ranks are int64 keys
``(order-preserving score bits << 32) | position``, so equal scores rank the larger (more recent) position
first, deterministically.

Samples of a batch that share a history (the same user, ~11 samples per user in Taobao-MM) are detected
(identical rows) and that history is fetched and scored once for all of their targets.
"""

import math
import struct
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from datapipes.batch import HISTORY_FEATURES, SEQUENCE_FEATURES, SPARSE_FEATURES, Batch, RawBatch
from model.mm_table import TABLE_DTYPES, MMTable, RowNorms, row_norms

# Bytes of table rows gathered per step: 4 MB (32,768 int8 or 16,384 bf16 rows of 128) stays in the last-level
# cache, so the dot products read the rows the gather just wrote from cache.
DEFAULT_CHUNK_BYTES = 4 << 20
DEFAULT_CHUNK_ROWS = DEFAULT_CHUNK_BYTES // 128  # for the released table (int8, D = 128)
_NO_KEY = torch.iinfo(torch.int64).min
_INT32_MIN, _INT32_MAX = torch.iinfo(torch.int32).min, torch.iinfo(torch.int32).max
# Most single-sample histories scored together in one block (int8: one [rows, D] x [D, histories] matmul).
_MAX_PACKED = 16
# Rounding allowances of the float filters (see _thresholds): bf16 output rounding is <= 2**-8 relative,
# float32 accumulation over D <= 128 terms is far below 2**-10 of |t| |r|.
_FILTER_REL = 2.0 ** -6
_FILTER_ABS = 2.0 ** -10
_SCORE_SLACK = 2.0 ** -20  # float64 rounding of the norms and the division, far below float32's


def cosine_topk(
    table: torch.Tensor,
    target_ids: torch.Tensor,
    history_ids: torch.Tensor,
    k: int,
    norms: Optional[RowNorms] = None,
    chunk_rows: Optional[int] = None,
    share_histories: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-``k`` history behaviors of each sample by cosine with its target in ``table``.

    table:       [N, D] float32, bfloat16 or int8 (int8 stands for value / 127); row 0 is padding.
    target_ids:  int64 [B] rows of ``table``.
    history_ids: int64 [B, L] rows of ``table``, 0 = padding (never selected); any L.
    k:           1 <= k <= L.
    norms:       optional precomputed ``RowNorms`` of ``table`` (``MMTable.norms``); computed once per table
                 tensor and cached otherwise.
    chunk_rows:  history rows gathered per step (default: DEFAULT_CHUNK_BYTES of rows); memory stays within
                 a few times ``chunk_rows * (D * itemsize + 32)`` bytes whatever B and L.
    share_histories: score identical history rows once for all their samples.

    Returns ``scores`` float32 [B, k]: cosine as on the float table, descending among valid slots (ties:
    larger position first); ``positions`` int64 [B, k]: indices into L; ``valid`` bool [B, k]: False where
    the sample has fewer than k non-padding behaviors (those slots come last, with score 0 and position 0).
    A zero content row has cosine 0.
    """
    _check_inputs(table, target_ids, history_ids, k)
    chunk_rows = chunk_rows_for(table, chunk_rows)
    norms = _norms_for(table, norms)
    batch, length = history_ids.shape
    scorer = _Scorer(table, norms, target_ids)
    state = _RunningTopK(batch, k)
    groups = _history_groups(history_ids) if share_histories else [[b] for b in range(batch)]
    buffer = torch.empty(chunk_rows, table.shape[1], dtype=table.dtype)
    dots = torch.empty(chunk_rows, 1, dtype=torch.int32)  # int8 tables: filter dots of packed histories
    for start, end in _pieces(length, k, chunk_rows):
        width = end - start
        found = _Candidates()
        for block in _blocks(groups, width, chunk_rows):
            rows = [members[0] for members in block]
            if len(rows) == 1:
                ids = history_ids[rows[0], start:end]
            else:
                ids = history_ids[torch.tensor(rows), start:end].reshape(-1)
            if not bool(ids.any()):
                continue
            gathered = _gather(table, ids, buffer)
            _filter_block(scorer, state, gathered, ids, block, start, width, dots, found)
            if found.size >= chunk_rows:  # keep memory bounded by the chunk, whatever the batch size
                found.merge_into(scorer, state)
                found = _Candidates()
        found.merge_into(scorer, state)
    return state.result()


def pair_cosine(table: torch.Tensor, norms: RowNorms, item_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """float32 [n] cosine(table[item_ids[i]], table[target_ids[i]]), bit-identical to the score ``cosine_topk``
    gives the same pair; 0 where either row is zero. item_ids, target_ids: int64 [n]."""
    items, targets = table.index_select(0, item_ids), table.index_select(0, target_ids)
    return _cosines(_exact_dots(items, targets), norms.sq_norm.index_select(0, item_ids),
                    norms.sq_norm.index_select(0, target_ids))


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


def _cosines(dots: torch.Tensor, sq_items: torch.Tensor, sq_targets: torch.Tensor) -> torch.Tensor:
    """float32 [n] = fl32(dot / sqrt(|r|^2 |t|^2)) computed in float64; dots float64 [n]. A zero row has dot 0 and
    gets +0.0 (the clamp only keeps 0 / 0 away, genuine products are far above it; + 0.0 turns -0.0 into +0.0,
    so every zero score has the same rank key)."""
    return (dots / (sq_items.double() * sq_targets.double()).clamp_min(1e-300).sqrt()).to(torch.float32) + 0.0


def _exact_dots(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float64 [...] dot products over the last dim of ``rows`` and ``targets`` (broadcastable, table dtype), one
    pair at a time with the same operations wherever the pair occurs, so equal pairs always get equal scores.
    int8 and bf16 are summed in float32: exact for int8 (integer sums below 2**24), and bf16 products are exact
    in float32 so only the sum rounds (~1e-7 relative); float32 tables are multiplied and summed in float64."""
    work = torch.float64 if rows.dtype == torch.float32 else torch.float32
    return (rows.to(work) * targets.to(work)).sum(-1).double()


# --------------------------------------------------------------------------------------------------------
# Validation and the per-table normalisation cache.


def _check_inputs(table: Any, target_ids: Any, history_ids: Any, k: Any) -> None:
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        raise ValueError(f"table: expected a 2-D tensor [N, D], got {_describe(table)}")
    if table.dtype not in TABLE_DTYPES.values():
        raise ValueError(f"table: dtype must be float32, bfloat16 or int8, got {table.dtype}")
    if table.shape[0] < 1 or table.shape[1] < 1:
        raise ValueError(f"table: width and row count must be at least 1, got shape {tuple(table.shape)}")
    if table.device.type != "cpu" or table.requires_grad:
        raise ValueError("table: must be a CPU tensor that does not require grad (the multimodal table is frozen)")
    for name, ids, dims in (("target_ids", target_ids, 1), ("history_ids", history_ids, 2)):
        if not isinstance(ids, torch.Tensor) or ids.dim() != dims or ids.dtype != torch.int64:
            raise ValueError(f"{name}: expected an int64 tensor with {dims} dimension(s), got {_describe(ids)}")
    if target_ids.shape[0] == 0:
        raise ValueError("target_ids: empty batch (B = 0)")
    if history_ids.shape[0] != target_ids.shape[0]:
        raise ValueError(f"history_ids: {history_ids.shape[0]} rows for {target_ids.shape[0]} targets")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: must be an int >= 1, got {k!r}")
    if k > history_ids.shape[1]:
        raise ValueError(f"k: {k} is larger than the history length L = {history_ids.shape[1]}")
    lo, hi = torch.aminmax(target_ids)
    if int(lo) < 0 or int(hi) >= table.shape[0]:
        raise ValueError(f"target_ids: ids must lie in [0, {table.shape[0]}) (the table's rows), got [{int(lo)}, {int(hi)}]")
    # history_ids are range-checked by the gather itself (_gather), which reads every one of them anyway.


def _gather(table: torch.Tensor, ids: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """table rows ``ids`` into ``buffer`` [>= len(ids), D]; ids outside the table raise ValueError (history_ids)."""
    try:
        return torch.index_select(table, 0, ids, out=buffer[: ids.shape[0]])
    except IndexError:
        lo, hi = torch.aminmax(ids)
        raise ValueError(f"history_ids: ids must lie in [0, {table.shape[0]}) (the table's rows), "
                         f"got [{int(lo)}, {int(hi)}]") from None


def chunk_rows_for(table: torch.Tensor, chunk_rows: Optional[int] = None) -> int:
    """``chunk_rows`` checked, or the default for ``table``: DEFAULT_CHUNK_BYTES of its rows (at least 1024)."""
    if chunk_rows is None:
        return max(1024, DEFAULT_CHUNK_BYTES // (table.shape[1] * table.element_size()))
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows: must be a positive int, got {chunk_rows!r}")
    return chunk_rows


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


_NORM_CACHE: Dict[int, Tuple[Any, Tuple, RowNorms]] = {}
_NORM_CACHE_SIZE = 4


def _norms_for(table: torch.Tensor, norms: Optional[RowNorms]) -> RowNorms:
    """``norms`` if given (checked against the table), else the cached ``row_norms(table)``: computed once per
    table tensor, recomputed if the tensor is modified in place (its version counter changes)."""
    if norms is not None:
        if not isinstance(norms, RowNorms) or norms.num_rows != table.shape[0]:
            raise ValueError(f"norms: expected RowNorms of {table.shape[0]} rows (row_norms(table))")
        return norms
    stamp = (table.data_ptr(), tuple(table.shape), table.stride(), table.dtype, table._version)
    entry = _NORM_CACHE.get(id(table))
    if entry is not None and entry[0]() is table and entry[1] == stamp:
        return entry[2]
    computed = row_norms(table)
    if len(_NORM_CACHE) >= _NORM_CACHE_SIZE:
        _NORM_CACHE.pop(next(iter(_NORM_CACHE)))
    _NORM_CACHE[id(table)] = (weakref.ref(table), stamp, computed)
    return computed


# --------------------------------------------------------------------------------------------------------
# Work decomposition: shared histories, pieces of positions, blocks of histories.


def _history_groups(history_ids: torch.Tensor) -> List[List[int]]:
    """Sample indices grouped by identical history rows (each group's first sample is its representative)."""
    batch, length = history_ids.shape
    if batch == 1:
        return [[0]]
    probe = torch.unique(torch.cat([torch.linspace(0, length - 1, 24).long(), torch.arange(max(0, length - 8), length)]))
    _, inverse = torch.unique(history_ids[:, probe], dim=0, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    groups: List[List[int]] = []
    for members in torch.split(order, torch.bincount(inverse).tolist()):
        pending = members.tolist()
        while pending:  # equal probes are only a hint: confirm on the whole row, split any mismatch off
            rep, same, rest = pending[0], [pending[0]], []
            for m in pending[1:]:
                (same if torch.equal(history_ids[m], history_ids[rep]) else rest).append(m)
            groups.append(same)
            pending = rest
    return groups


def _pieces(length: int, k: int, chunk_rows: int) -> List[Tuple[int, int]]:
    """Position ranges, newest first, growing 4x from a short first piece (enough to fill the top k and set a
    threshold) up to ``chunk_rows``, so the threshold is already tight when the long chunks come."""
    pieces: List[Tuple[int, int]] = []
    size, end = min(chunk_rows, max(8 * k, 256)), length
    while end > 0:
        pieces.append((max(0, end - size), end))
        end -= size
        size = min(chunk_rows, size * 4)
    return pieces


def _blocks(groups: List[List[int]], width: int, chunk_rows: int) -> List[List[List[int]]]:
    """The groups of one piece, in blocks: single-sample histories packed up to ``chunk_rows`` gathered rows
    (and _MAX_PACKED histories), a history shared by several samples alone in its block."""
    blocks: List[List[List[int]]] = []
    packed: List[List[int]] = []
    limit = max(1, min(_MAX_PACKED, chunk_rows // max(1, width)))
    for members in groups:
        if len(members) > 1:
            blocks.append([members])
            continue
        packed.append(members)
        if len(packed) == limit:
            blocks.append(packed)
            packed = []
    if packed:
        blocks.append(packed)
    return blocks


# --------------------------------------------------------------------------------------------------------
# Scoring.


class _Scorer:
    """Dtype-specific pieces: filter dot products and their thresholds.

    The filter dot of a row with a target is exact for int8 (int32 from ``torch._int_mm``) and within the
    _FILTER_* allowances for bf16/float32 (a matmul in the table's dtype with float32 accumulation).
    """

    def __init__(self, table: torch.Tensor, norms: RowNorms, target_ids: torch.Tensor):
        self.norms = norms
        self.exact_int = table.dtype == torch.int8
        self.targets = table.index_select(0, target_ids)  # [B, D], table dtype
        self.sq_t = norms.sq_norm.index_select(0, target_ids).double()  # [B]
        self.inv_t = [1.0 / math.sqrt(v) if v > 0 else 0.0 for v in self.sq_t.tolist()]
        self.inv_min, self.inv_max = 1.0 / norms.max_norm, 1.0 / norms.min_norm
        # _int_mm is wrong for D = 1 on CPU (torch 2.13): float32 is exact there and used instead.
        self.int_mm = self.exact_int and table.shape[1] > 1
        self._columns: Dict[Tuple[int, ...], torch.Tensor] = {}

    def columns(self, samples: List[int]) -> torch.Tensor:
        """Targets of ``samples`` as a contiguous [D, G'] matrix, G' = G or (int8, G > 1) G rounded up to a multiple
        of 8 with zero columns, which _int_mm runs much faster. Cached: a sample's columns are reused per piece."""
        key = tuple(samples)
        if key not in self._columns:
            columns = self.targets[samples].t()
            if self.int_mm and len(samples) > 1 and len(samples) % 8:
                columns = torch.nn.functional.pad(columns, (0, 8 - len(samples) % 8))
            self._columns[key] = columns.contiguous()
        return self._columns[key]

    def dots(self, gathered: torch.Tensor, samples: List[int], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[R, G] filter dot products of gathered rows [R, D] with the targets of ``samples`` (int8: written
        into ``out`` [R, 1] int32 when given, for one sample)."""
        columns = self.columns(samples)
        if self.int_mm:
            if out is not None:
                return torch._int_mm(gathered, columns, out=out)
            return torch._int_mm(gathered, columns)[:, : len(samples)]
        if self.exact_int:
            result = torch.mm(gathered.to(torch.float32), columns.to(torch.float32)).to(torch.int32)
            return result if out is None else out.copy_(result)
        return torch.mm(gathered, columns)

    def packed_dots(self, gathered: torch.Tensor, samples: List[int], width: int, out: torch.Tensor) -> torch.Tensor:
        """[nb, width] filter dots of nb packed histories (width rows each), each with its own sample's target.
        out: int32 [>= nb * width, 1] scratch for int8 tables."""
        nb = len(samples)
        if nb == 1:
            return self.dots(gathered, samples, out[:width] if self.exact_int else None).view(1, width)
        if self.exact_int:  # one matmul against all nb targets (a parallel op), keep history i x target i
            return torch.diagonal(self.dots(gathered, samples).view(nb, width, nb), dim1=0, dim2=2).t().contiguous()
        targets = self.targets[samples]  # [nb, D]
        return torch.bmm(gathered.view(nb, width, -1), targets[:, :, None]).view(nb, width)

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
            need = low / ((self.inv_max if low > 0 else self.inv_min) * inv_t)
            if not self.exact_int:
                need -= _FILTER_ABS / (inv_t * self.inv_min)
                need = need / (1 + _FILTER_REL) if need >= 0 else need / (1 - _FILTER_REL)
            out.append(need)
        return out

    def threshold_tensor(self, needs: List[float]) -> torch.Tensor:
        """[G] thresholds in the filter dots' dtype, rounded down (int32 for int8, float32 otherwise)."""
        if self.exact_int:
            return torch.tensor([_INT32_MIN if n == -math.inf else _INT32_MAX if n == math.inf
                                 else max(_INT32_MIN, min(_INT32_MAX, math.floor(n) - 1)) for n in needs], dtype=torch.int32)
        return torch.tensor([_float32_at_most(n) for n in needs], dtype=torch.float32)


def _float32_at_most(value: float) -> float:
    """The largest float32 <= value (value may be +-inf)."""
    rounded = np.float32(value)
    if float(rounded) > value:
        rounded = np.nextafter(rounded, np.float32(-np.inf))
    return float(rounded)


class _RunningTopK:
    """Per-sample top-k as int64 keys (order-preserving score bits << 32 | position); _NO_KEY = empty slot.
    tau[b] is the score of sample b's k-th key (-inf until it has k)."""

    def __init__(self, batch: int, k: int):
        self.k = k
        self.keys = torch.full((batch, k), _NO_KEY, dtype=torch.int64)
        self.tau = [-math.inf] * batch

    def merge(self, samples: List[int], columns: torch.Tensor, keys: torch.Tensor) -> None:
        """Merge candidate ``keys`` [m] of block columns ``columns`` [m] (ascending; column j = samples[j])."""
        if len(samples) == 1:
            merged = torch.topk(torch.cat([self.keys[samples[0]], keys]), self.k, sorted=False).values[None, :]
            self.keys[samples[0]] = merged[0]
        else:
            index = torch.tensor(samples)
            g = len(samples)
            counts = torch.bincount(columns, minlength=g)
            starts = torch.cumsum(counts, 0) - counts
            rank = torch.arange(keys.shape[0]) - starts.index_select(0, columns)
            pending = torch.full((g, int(counts.max())), _NO_KEY, dtype=torch.int64)
            pending[columns, rank] = keys
            merged = torch.topk(torch.cat([self.keys.index_select(0, index), pending], 1), self.k, dim=1, sorted=False).values
            self.keys[index] = merged
        for sample, kth in zip(samples, merged.min(1).values.tolist()):
            self.tau[sample] = -math.inf if kth == _NO_KEY else _key_score(kth)

    def result(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys = torch.sort(self.keys, dim=1, descending=True).values
        valid = keys != _NO_KEY
        ordered = (keys >> 32).to(torch.int32)
        scores = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)
        scores = torch.where(valid, scores, torch.zeros((), dtype=torch.float32))
        positions = torch.where(valid, keys & 0xFFFFFFFF, torch.zeros((), dtype=torch.int64))
        return scores, positions, valid


def _keys(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering by score (float32, no NaN, no -0.0) then position, both descending: the float's bits
    with the magnitude flipped for negatives (an order-preserving int32) in the high word, position low."""
    bits = scores.view(torch.int32).to(torch.int64)
    return ((bits ^ ((bits >> 31) & 0x7FFFFFFF)) << 32) | positions


def _key_score(key: int) -> float:
    ordered = key >> 32
    return struct.unpack("<f", struct.pack("<i", ordered ^ 0x7FFFFFFF if ordered < 0 else ordered))[0]


class _Candidates:
    """Candidates of one piece, collected block by block and merged once: per segment (a sample with
    candidates) its sample index; per candidate its segment, position in L, table row and exact dot (float64)."""

    def __init__(self) -> None:
        self.samples: List[int] = []
        self.parts: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.size = 0

    def add(self, samples: List[int], columns: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor,
            dots: torch.Tensor) -> None:
        """columns [m] ascending in [0, len(samples)); positions, ids int64 [m]; dots float64 [m]."""
        self.parts.append((columns + len(self.samples), positions, ids, dots))
        self.samples.extend(samples)
        self.size += int(columns.shape[0])

    def merge_into(self, scorer: "_Scorer", state: "_RunningTopK") -> None:
        if not self.parts:
            return
        columns, positions, ids, dots = (torch.cat(x) if len(self.parts) > 1 else x[0] for x in zip(*self.parts))
        sample_of = torch.tensor(self.samples).index_select(0, columns)
        scores = _cosines(dots, scorer.norms.sq_norm.index_select(0, ids), scorer.sq_t.index_select(0, sample_of))
        state.merge(self.samples, columns, _keys(scores, positions))


def _filter_block(scorer: _Scorer, state: _RunningTopK, gathered: torch.Tensor, ids: torch.Tensor,
                  block: List[List[int]], start: int, width: int, dots_out: torch.Tensor, found: _Candidates) -> None:
    """Filter one block: add the rows whose exact score could reach their sample's running k-th to ``found``.

    block: either nb packed single-sample histories (gathered [nb * width, D], history i at rows i*width...)
           or one history shared by the G samples of ``block[0]`` (gathered [width, D]).
    ids: int64 [rows] the gathered table rows; start: position of the block's first column in L.
    """
    packed = len(block) > 1 or len(block[0]) == 1
    samples = [members[0] for members in block] if packed else block[0]
    taus = [state.tau[s] for s in samples]
    if not scorer.exact_int and max(taus) == -math.inf:
        # Nothing to filter against yet (every row is a candidate): score the block directly.
        _add_all(scorer, gathered, ids, samples, packed, start, width, found)
        return
    needs = scorer.thresholds(taus, samples)
    need = scorer.threshold_tensor(needs)
    if packed:
        dots = scorer.packed_dots(gathered, samples, width, dots_out)  # [nb, width]
        local = (dots >= need[:, None]).view(-1).nonzero().squeeze(1)  # ascending: grouped by history
        if local.numel() == 0:
            return
        columns = local // width if len(samples) > 1 else torch.zeros_like(local)
        d = dots.view(-1).index_select(0, local)
        within = local - columns * width if len(samples) > 1 else local
    else:
        dots = scorer.dots(gathered, samples)  # [width, G]
        hits = (dots >= need[None, :]).nonzero()  # (row, column), row-major
        if hits.shape[0] == 0:
            return
        hits = hits.index_select(0, torch.argsort(hits[:, 1], stable=True))  # column-major: grouped by sample
        local, columns = hits[:, 0], hits[:, 1]
        d = dots[local, columns]
        within = local
    cand_ids = ids.index_select(0, local)
    if min(needs) <= 0:  # padding rows (dot 0) can pass a threshold <= 0: drop them
        real = cand_ids != 0
        if not bool(real.all()):
            columns, local, d, within, cand_ids = columns[real], local[real], d[real], within[real], cand_ids[real]
            if columns.numel() == 0:
                return
    if scorer.exact_int:
        exact = d.double()
    else:
        targets = scorer.targets.index_select(0, torch.tensor(samples).index_select(0, columns))
        exact = _exact_dots(gathered.index_select(0, local), targets)
    found.add(samples, columns, within + start, cand_ids, exact)


def _add_all(scorer: _Scorer, gathered: torch.Tensor, ids: torch.Tensor, samples: List[int], packed: bool,
             start: int, width: int, found: _Candidates) -> None:
    """Every non-padding row of a block is a candidate: exact dots of the whole block at once."""
    targets = scorer.targets[samples]  # [G, D]
    if packed:  # history i against target i: [nb, width]
        dots = _exact_dots(gathered.view(len(samples), width, -1), targets[:, None, :])
        columns = torch.arange(len(samples)).repeat_interleave(width)
        within = torch.arange(width).repeat(len(samples))
        flat_ids = ids
    else:  # one history against every target: [G, width]
        dots = _exact_dots(gathered[None, :, :], targets[:, None, :])
        columns = torch.arange(len(samples)).repeat_interleave(width)
        within = torch.arange(width).repeat(len(samples))
        flat_ids = ids.repeat(len(samples))
    real = flat_ids != 0
    if not bool(real.any()):
        return
    found.add(samples, columns[real], within[real] + start, flat_ids[real], dots.reshape(-1)[real])


# --------------------------------------------------------------------------------------------------------
# The input-pipeline stage.


@dataclass(frozen=True)
class _Selection:
    """Per-sample ragged selection of history positions, as a padded [B, W] matrix plus lengths."""

    positions: torch.Tensor  # int64 [B, W], valid slots first
    lengths: torch.Tensor  # int64 [B]

    @property
    def mask(self) -> torch.Tensor:
        return torch.arange(self.positions.shape[1])[None, :] < self.lengths[:, None]

    @classmethod
    def empty(cls, batch: int) -> "_Selection":
        return cls(torch.zeros(batch, 0, dtype=torch.int64), torch.zeros(batch, dtype=torch.int64))


class GsuStage:
    """Picklable ``RawBatch -> Batch`` transform run in DataLoader workers (and at inference).

    config: anything with ``gsu`` ("none" | "category" | "multimodal" | "id" | "attention"), ``k`` and
            ``recent_len`` (``model.config.ModelConfig``).
    mm_table: ``MMTable`` (or a raw [N, D] tensor; its normalisation is then computed here, once).

    The Batch carries: recent_* = the last ``recent_len`` non-padding behaviors, oldest first, with their
    cosines ``recent_scores`` [B, recent_len]; gsu_* = the selected behaviors with ``gsu_scores`` [B, k]:
    "multimodal" (MUSE) the cosine top-k in descending score, "category" (SIM-hard) the k most recent
    behaviors of the target's category, newest first, "none" (DIN), "id" (SIM-soft) and "attention" (TWIN)
    none; the last two add hist_* (the whole non-padding history, oldest first) and ``history_scores`` [B, L].
    """

    def __init__(self, config: Any, mm_table: Any, chunk_rows: Optional[int] = None):
        for field in ("gsu", "k", "recent_len"):
            if not hasattr(config, field):
                raise ValueError(f"config: has no field {field!r} (expected a ModelConfig)")
        if config.gsu not in ("none", "category", "multimodal", "id", "attention"):
            raise ValueError(f"config.gsu: unknown GSU {config.gsu!r}")
        self.config = config
        self.mm_table = mm_table if isinstance(mm_table, MMTable) else MMTable(mm_table)
        self.chunk_rows = chunk_rows

    def __call__(self, raw: RawBatch) -> Batch:
        cfg, table, norms = self.config, self.mm_table.table, self.mm_table.norms
        items, cats, batch = raw.history_items, raw.history_cats, raw.batch_size
        in_model = cfg.gsu in ("id", "attention")
        recent = _last_matches(lambda rows, lo: items[rows, lo:] != 0, batch, items.shape[1], cfg.recent_len)
        recent_ids = _take(items, recent)
        sequence = {
            "target_item": (raw.target_item, torch.ones_like(raw.target_item)),
            "target_cat": (raw.target_cat, torch.ones_like(raw.target_cat)),
            "recent_item": (recent_ids, recent.lengths),
            "recent_cat": (_take(cats, recent), recent.lengths),
        }
        chosen, scores = self._pipeline_gsu(raw, table, norms)
        sequence["gsu_item"] = (_take(items, chosen), chosen.lengths)
        sequence["gsu_cat"] = (_take(cats, chosen), chosen.lengths)
        history_scores = None
        if in_model:
            whole = _all_real(items != 0)
            sequence["hist_item"] = (_take(items, whole), whole.lengths)
            sequence["hist_cat"] = (_take(cats, whole), whole.lengths)
            history_scores = _left_align(history_cosines(table, norms, raw.target_item, items, self.chunk_rows), whole)
        keys = list(SEQUENCE_FEATURES) + (list(HISTORY_FEATURES) if in_model else [])
        return Batch(
            sparse_features=_sparse_features(raw),
            sequence_features=_kjt(sequence, keys),
            labels=raw.labels.to(torch.float32),
            recent_scores=_scores_for(table, norms, recent_ids, raw.target_item, recent, cfg.recent_len),
            gsu_scores=scores,
            history_scores=history_scores,
        )

    def _pipeline_gsu(self, raw: RawBatch, table: torch.Tensor, norms: RowNorms) -> Tuple[_Selection, torch.Tensor]:
        """The GSU of the pipeline variants: (selection, float32 [B, k] scores aligned with it)."""
        k, batch, length = self.config.k, raw.batch_size, raw.history_items.shape[1]
        if self.config.gsu not in ("category", "multimodal") or length == 0:
            return _Selection.empty(batch), torch.zeros(batch, k, dtype=torch.float32)
        if self.config.gsu == "multimodal":
            width = min(k, length)
            scores, positions, valid = cosine_topk(table, raw.target_item, raw.history_items, width, norms=norms,
                                                   chunk_rows=self.chunk_rows)
            scores = torch.where(valid, scores, torch.zeros((), dtype=torch.float32))
            return _Selection(positions, valid.sum(1)), _pad_to(scores, k)
        items, cats, target_cat = raw.history_items, raw.history_cats, raw.target_cat

        def same_category(rows: torch.Tensor, lo: int) -> torch.Tensor:
            wanted = target_cat[rows, None]
            return (items[rows, lo:] != 0) & (cats[rows, lo:] == wanted) & (wanted != 0)

        chosen = _last_matches(same_category, batch, length, k, newest_first=True)
        return chosen, _scores_for(table, norms, _take(items, chosen), raw.target_item, chosen, k)

    def __repr__(self) -> str:
        return f"GsuStage(gsu={self.config.gsu!r}, k={self.config.k}, recent_len={self.config.recent_len}, {self.mm_table!r})"


def _last_matches(match: Callable[[torch.Tensor, int], torch.Tensor], batch: int, length: int, count: int,
                  newest_first: bool = False) -> _Selection:
    """The last ``count`` positions of each row where ``match(rows, lo)`` (bool [len(rows), length - lo], the
    window of positions lo..L-1) is True: oldest first, or newest first. Looks back through growing windows,
    so only rows that need it are scanned far."""
    width = min(count, length)
    if width == 0:
        return _Selection.empty(batch)
    found = torch.full((batch, width), -1, dtype=torch.int64)
    pending = torch.arange(batch)
    window = min(length, max(4 * width, 256))
    while pending.numel():
        lo = length - window
        key = torch.where(match(pending, lo), torch.arange(lo, length)[None, :], torch.full((), -1))
        newest = torch.topk(key, width, dim=1).values  # descending positions, -1 past the matches
        done = (newest[:, -1] >= 0) | (lo == 0)
        found[pending[done]] = newest[done]
        pending = pending[~done]
        window = min(length, window * 4)
    lengths = (found >= 0).sum(1)
    if not newest_first:
        slots = torch.arange(width)[None, :]
        found = torch.where(slots < lengths[:, None], found.gather(1, (lengths[:, None] - 1 - slots).clamp_min(0)), found)
    return _Selection(found.clamp_min(0), lengths)


def _all_real(real: torch.Tensor) -> _Selection:
    """Every True position of ``real`` [B, L], left-aligned in order."""
    lengths = real.sum(1)
    width = int(lengths.max()) if lengths.numel() else 0
    hits = real.nonzero()  # row-major: (row, position) in order
    starts = torch.cumsum(lengths, 0) - lengths
    rank = torch.arange(hits.shape[0]) - starts.index_select(0, hits[:, 0])
    positions = torch.zeros(real.shape[0], width, dtype=torch.int64)
    positions[hits[:, 0], rank] = hits[:, 1]
    return _Selection(positions, lengths)


def _take(values: torch.Tensor, selection: _Selection) -> torch.Tensor:
    """Flat values [sum(lengths)] of ``values`` [B, L] at the selected positions, sample by sample."""
    return values.gather(1, selection.positions)[selection.mask]


def _left_align(per_position: torch.Tensor, whole: _Selection) -> torch.Tensor:
    """[B, L] values at the selected positions moved to the front (aligned with hist_*), 0 after."""
    out = torch.zeros_like(per_position)
    width = whole.positions.shape[1]
    out[:, :width] = torch.where(whole.mask, per_position.gather(1, whole.positions), torch.zeros(()))
    return out


def _scores_for(table: torch.Tensor, norms: RowNorms, flat_ids: torch.Tensor, target_ids: torch.Tensor,
                selection: _Selection, width: int) -> torch.Tensor:
    """float32 [B, width]: cosines of the selected behaviors (flat_ids, sample-major) with their targets, 0 after."""
    out = torch.zeros(target_ids.shape[0], width, dtype=torch.float32)
    mask = selection.mask
    if flat_ids.numel():
        targets = target_ids[:, None].expand_as(mask)[mask]
        out[:, : mask.shape[1]][mask] = pair_cosine(table, norms, flat_ids, targets)
    return out


def _pad_to(values: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(values, (0, width - values.shape[1])) if values.shape[1] < width else values


def _sparse_features(raw: RawBatch) -> KeyedJaggedTensor:
    columns = [raw.user_id] + [raw.profile[:, i] for i in range(raw.profile.shape[1])] + [raw.item_city, raw.item_province]
    if len(columns) != len(SPARSE_FEATURES):
        raise ValueError(f"raw.profile: expected {len(SPARSE_FEATURES) - 3} columns, got {raw.profile.shape[1]}")
    values = torch.cat([c.reshape(-1).to(torch.int64) for c in columns])
    return KeyedJaggedTensor.from_lengths_sync(keys=list(SPARSE_FEATURES), values=values,
                                               lengths=torch.ones(values.shape[0], dtype=torch.int64))


def _kjt(features: Dict[str, Tuple[torch.Tensor, torch.Tensor]], keys: List[str]) -> KeyedJaggedTensor:
    values = torch.cat([features[key][0].reshape(-1).to(torch.int64) for key in keys])
    lengths = torch.cat([features[key][1].to(torch.int64) for key in keys])
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)
