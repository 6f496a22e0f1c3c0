"""The frozen multimodal table: one content embedding per item, read-only, shared by every data worker.

``prepare`` writes ``mm_table.npy``: int8 [N, D] (N = item vocabulary + 1, D = 128), row 0 all zeros
(padding). The float table it stands for is ``value / 127``. ``MMTable.load`` memory-maps it (the pages are
shared by DataLoader workers, never copied per worker), optionally converts it once to bfloat16 or float32
(``value / 127``, in shared memory), and computes the per-row normalisation once (``RowNorms``), so that a
cosine is a dot product divided by two stored norms. A converted table also gets its int8 filter shadow once
(``model.gsu.shadow``: N x D int8 in shared memory, half a bf16 table), which the GSU's prefilter reads instead
of the wider rows; ``int8_filter=False`` skips it. The table is a plain tensor, not an ``nn.Parameter``: it
never receives a gradient and has no optimizer state.
"""

import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from common.errors import DataError, UserError
from common.io import path_manager
from model.gsu.shadow import FilterShadow, filter_shadow

TABLE_DTYPES = {"int8": torch.int8, "bfloat16": torch.bfloat16, "float32": torch.float32}
INT8_SCALE = 127.0
_NORM_CHUNK_ROWS = 1 << 15


@dataclass(frozen=True)
class RowNorms:
    """Per-row normalisation of a table [N, D], computed once.

    sq_norm: [N] squared L2 norm of each row: float32 for int8 tables (integers below 2**24, exact),
             float64 otherwise. 0 for an all-zero row (whose cosine with anything is 0).
    min_norm, max_norm: smallest and largest norm over the non-zero rows (1.0 when every row is zero); the
             GSU bounds a cosine from a dot product with them before it looks up a row's own norm.
    A cosine is ``dot(r, t) / sqrt(sq_norm[r] * sq_norm[t])`` (in float64), the same for int8 values and
    value / 127: cosines do not depend on the scale.
    """

    sq_norm: torch.Tensor
    min_norm: float
    max_norm: float

    @property
    def num_rows(self) -> int:
        return int(self.sq_norm.shape[0])

    def share_memory_(self) -> "RowNorms":
        self.sq_norm.share_memory_()
        return self


def row_norms(table: torch.Tensor, chunk_rows: int = _NORM_CHUNK_ROWS) -> RowNorms:
    """``RowNorms`` of a 2-D table (int8, bfloat16 or float32), ``chunk_rows`` rows at a time.

    int8 rows are squared and summed in float32 (exact: at most 128 * 128**2 < 2**24 per row for D <= 1024),
    other dtypes in float64, so identical rows always get identical norms.
    """
    if table.dim() != 2:
        raise ValueError(f"table: expected a 2-D tensor [N, D], got shape {tuple(table.shape)}")
    n, width = table.shape
    exact32 = table.dtype == torch.int8 and width * 128 * 128 < 2 ** 24
    work = torch.float32 if exact32 else torch.float64
    sq = torch.empty(n, dtype=work)
    for start in range(0, n, chunk_rows):
        rows = table[start:start + chunk_rows].to(work)
        torch.sum(rows * rows, dim=1, out=sq[start:start + rows.shape[0]])
    largest = float(sq.max()) if n else 0.0
    if largest == 0.0:
        return RowNorms(sq, 1.0, 1.0)
    smallest = float(torch.where(sq > 0, sq, torch.full((), math.inf, dtype=work)).min())
    return RowNorms(sq, math.sqrt(smallest), math.sqrt(largest))


def _npy_path(path: str) -> str:
    """``path`` itself if it names a file, else ``path/mm_table.npy`` (a prepared dataset directory)."""
    candidate = os.path.join(path, "mm_table.npy") if path_manager.isdir(path) else path
    if not path_manager.exists(candidate):
        raise UserError(f"{candidate}: no multimodal table (expected a prepared dataset or an mm_table.npy)")
    return path_manager.get_local_path(candidate)


def _open_int8(local_path: str, expected_dim: Optional[int]) -> torch.Tensor:
    try:
        array = np.load(local_path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise DataError(f"{local_path}: (file): not a readable .npy array: {err}") from None
    if array.ndim != 2 or array.dtype != np.int8:
        raise DataError(f"{local_path}: (file): shape {array.shape} {array.dtype}, expected int8 [N, D]")
    if expected_dim is not None and array.shape[1] != expected_dim:
        raise DataError(f"{local_path}: (file): width {array.shape[1]}, expected mm_dim {expected_dim}")
    if array.shape[0] < 1 or np.any(array[0]):
        raise DataError(f"{local_path}: (file): row 0 (padding) must exist and be all zeros")
    return _from_numpy(array)


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``array``'s memory. A read-only memory map makes torch warn that the tensor is not
    writable; nothing ever writes to the multimodal table."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


class MMTable:
    """The frozen multimodal table and its normalisation.

    table: [N, D] int8 (memory-mapped ``mm_table.npy``; float value = int8 / 127), bfloat16 or float32
           (converted once, held in shared memory). Row 0 is the padding row (zeros).
    norms: ``RowNorms`` of ``table``.
    shadow: the int8 ``FilterShadow`` of a bfloat16/float32 table (None for int8, or when ``int8_filter`` is
            False): N x D int8 bytes, read by the GSU's prefilter (``cosine_topk(shadow=...)``).
    Pickles by path (int8) or through shared memory (converted tables), so DataLoader workers share it.
    """

    def __init__(self, table: torch.Tensor, norms: Optional[RowNorms] = None, source: Optional[str] = None,
                 shadow: Optional[FilterShadow] = None, int8_filter: bool = True):
        if isinstance(table, np.ndarray):
            table = _from_numpy(table)
        if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.dtype not in TABLE_DTYPES.values():
            raise ValueError(f"table: expected a 2-D int8/bfloat16/float32 tensor or numpy array, got {getattr(table, 'dtype', type(table).__name__)} {tuple(getattr(table, 'shape', ()))}")
        if table.requires_grad:
            raise ValueError("table: the multimodal table is frozen; pass a tensor that does not require grad")
        self.table = table
        self.norms = norms if norms is not None else row_norms(table)
        if self.norms.num_rows != table.shape[0]:
            raise ValueError(f"norms: {self.norms.num_rows} rows for a table of {table.shape[0]}")
        self.source = source
        self.shadow: Optional[FilterShadow] = None
        if table.dtype != torch.int8 and int8_filter:
            self.shadow = shadow if shadow is not None else filter_shadow(table, self.norms.sq_norm).share_memory_()
            if tuple(self.shadow.rows.shape) != tuple(table.shape):
                raise ValueError(f"shadow: {tuple(self.shadow.rows.shape)} rows for a table of {tuple(table.shape)}")

    @classmethod
    def load(cls, path: str, dtype: str = "int8", expected_dim: Optional[int] = None,
             int8_filter: bool = True) -> "MMTable":
        """Open ``path`` (a prepared dataset directory or an ``mm_table.npy``) as ``dtype`` (int8 | bfloat16 | float32);
        ``int8_filter``: build the int8 filter shadow of a converted table (see the class)."""
        if dtype not in TABLE_DTYPES:
            raise UserError(f"--mm-dtype {dtype}: must be one of {', '.join(TABLE_DTYPES)}")
        local = _npy_path(path)
        raw = _open_int8(local, expected_dim)
        if dtype == "int8":
            return cls(raw, row_norms(raw).share_memory_(), source=local)
        converted = torch.empty(raw.shape, dtype=TABLE_DTYPES[dtype]).share_memory_()
        for start in range(0, raw.shape[0], _NORM_CHUNK_ROWS):
            chunk = raw[start:start + _NORM_CHUNK_ROWS]
            converted[start:start + chunk.shape[0]] = (chunk.to(torch.float32) / INT8_SCALE).to(converted.dtype)
        # bfloat16 rounding of value/127 changes the rows slightly: normalise what the GSU will read.
        return cls(converted, row_norms(converted).share_memory_(), source=None, int8_filter=int8_filter)

    @property
    def num_rows(self) -> int:
        return int(self.table.shape[0])

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.table.dtype

    def __reduce__(self):
        if self.source is not None:
            return (_reopen, (self.source, self.norms))
        return (MMTable, (self.table, self.norms, None, self.shadow, self.shadow is not None))

    def __repr__(self) -> str:
        return f"MMTable({self.num_rows} x {self.dim} {str(self.dtype).replace('torch.', '')}, source={self.source!r})"


def _reopen(source: str, norms: RowNorms) -> MMTable:
    """Unpickle an int8 table: map the same file again instead of copying its bytes."""
    return MMTable(_open_int8(source, None), norms, source=source)
