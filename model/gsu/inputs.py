"""Argument checks, work sizes and the per-table normalisation and int8 filter shadow caches of the GSU (``model.gsu.topk``)."""

import weakref
from typing import Any, Dict, Optional, Tuple

import torch

from model.gsu.shadow import FilterShadow, filter_shadow
from model.gsu.table import TABLE_DTYPES, RowNorms, row_norms

# History positions filtered per step (one threshold check, one candidate merge): the bound on per-step
# memory, a few bytes per row and target, whatever B and L.
DEFAULT_CHUNK_ROWS = 32768
# Bytes of table rows gathered at once (4,096 int8 or 2,048 bf16 rows of 128): half of a core's L2, so the
# dot products read the rows the gather has just written while they are still in L2.
GATHER_BYTES = 512 << 10


def check_inputs(table: Any, target_ids: Any, history_ids: Any, k: Any) -> None:
    """ValueError naming the argument for every bad input ``cosine_topk`` can detect before gathering
    (history ids outside the table are caught by the gather itself, ``gather``)."""
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


def gather(table: torch.Tensor, ids: torch.Tensor, buffer: Optional[torch.Tensor] = None) -> torch.Tensor:
    """table rows ``ids`` [n] -> [n, D], into ``buffer`` [>= n, D] when given; ids outside the table raise
    ValueError (history_ids)."""
    try:
        if buffer is None:
            return table.index_select(0, ids)
        return torch.index_select(table, 0, ids, out=buffer[: ids.shape[0]])
    except IndexError:
        lo, hi = torch.aminmax(ids)
        raise ValueError(f"history_ids: ids must lie in [0, {table.shape[0]}) (the table's rows), "
                         f"got [{int(lo)}, {int(hi)}]") from None


def chunk_rows_for(table: torch.Tensor, chunk_rows: Optional[int] = None) -> int:
    """``chunk_rows`` checked, or DEFAULT_CHUNK_ROWS. ``table`` [N, D] is accepted for callers that size
    their own gathers from it."""
    if chunk_rows is None:
        return DEFAULT_CHUNK_ROWS
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows: must be a positive int, got {chunk_rows!r}")
    return chunk_rows


def gather_rows_for(table: torch.Tensor, chunk_rows: int) -> int:
    """Rows of ``table`` [N, D] gathered at once: GATHER_BYTES of them (at least 256), at most ``chunk_rows``."""
    return max(1, min(chunk_rows, max(256, GATHER_BYTES // (table.shape[1] * table.element_size()))))


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


_NORM_CACHE: Dict[int, Tuple[Any, Tuple, RowNorms]] = {}
_SHADOW_CACHE: Dict[int, Tuple[Any, Tuple, FilterShadow]] = {}
_NORM_CACHE_SIZE = 4


def norms_for(table: torch.Tensor, norms: Optional[RowNorms]) -> RowNorms:
    """``norms`` if given (checked against the table), else the cached ``row_norms(table)``: computed once per
    table tensor, recomputed if the tensor is modified in place by torch (its version counter changes). Writes
    that torch does not see (through a numpy array or memory map sharing the tensor's memory, or ``.data``) leave
    the cached norms stale: pass ``norms`` (``row_norms(table)``) after such a write. The project's tables are
    frozen (``MMTable``), so it never writes one."""
    if norms is not None:
        if not isinstance(norms, RowNorms) or norms.num_rows != table.shape[0]:
            raise ValueError(f"norms: expected RowNorms of {table.shape[0]} rows (row_norms(table))")
        return norms
    return _cached(_NORM_CACHE, table, row_norms)


def shadow_for(table: torch.Tensor, norms: RowNorms, shadow: Optional[FilterShadow],
               int8_filter: bool) -> Optional[FilterShadow]:
    """The int8 ``FilterShadow`` the filter of a bf16/float32 ``table`` reads (None for int8 tables or when
    ``int8_filter`` is False): ``shadow`` if given (checked against the table), else built once per table tensor
    (with the table's ``norms``) and cached like the norms (``norms_for``)."""
    if table.dtype == torch.int8 or not int8_filter:
        return None
    if shadow is not None:
        if not isinstance(shadow, FilterShadow) or tuple(shadow.rows.shape) != tuple(table.shape):
            raise ValueError(f"shadow: expected the FilterShadow of a {tuple(table.shape)} table (filter_shadow(table))")
        return shadow
    return _cached(_SHADOW_CACHE, table, lambda t: filter_shadow(t, norms.sq_norm))


def _cached(cache: Dict[int, Tuple[Any, Tuple, Any]], table: torch.Tensor, compute: Any) -> Any:
    """compute(table), once per table tensor, again if the tensor is modified in place (its version changes)."""
    stamp = (table.data_ptr(), tuple(table.shape), table.stride(), table.dtype, table._version)
    entry = cache.get(id(table))
    if entry is not None and entry[0]() is table and entry[1] == stamp:
        return entry[2]
    computed = compute(table)
    if len(cache) >= _NORM_CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[id(table)] = (weakref.ref(table), stamp, computed)
    return computed
