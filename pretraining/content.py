"""Raw content vectors (text/image encoder outputs) keyed by item id, validated, of any width.

Layouts (by file name):
- ``*.parquet``: an integer item-id column (default ``205``) and a list column of floats or ints (default
  ``content``; list, large_list or fixed_size_list), every row the same width; read row group by row group.
- ``*.npy``: a 2-D numeric array [N, D] (memory-mapped) with the item ids in a second .npy, int [N]
  (``--content-ids``, default the same path ending in ``.ids.npy`` instead of ``.npy``).
- ``*.npz``: arrays ``ids`` [N] and ``vectors`` [N, D].
Ids must be nonzero (0 is padding) and distinct, vectors finite. Problems are ``DataError``: ``FILE: COLUMN: what``.
"""

import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
import pyarrow as pa

from common.errors import DataError
from common.io import path_manager
from datapipes import schema as S
from datapipes.rawread import RawFile, one_line, open_parquet

_CHUNK_ROWS = 65536


@dataclass
class ContentTable:
    """``vectors[r]`` is the content of item ``ids[r]``; ``mean`` [D] and ``scale`` standardize them."""

    path: str
    ids: np.ndarray       # int64 [N]
    vectors: np.ndarray   # [N, D] numeric (float32 in memory, or a read-only memmap of a .npy)
    mean: np.ndarray      # float64 [D]
    scale: float          # root mean square of the centered values
    order: np.ndarray = field(init=False, repr=False)  # int64 [N]: rows by ascending id

    def __post_init__(self) -> None:
        self.order = np.argsort(self.ids, kind="stable")

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.ids.size)

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        """int64 row of each item id (same shape), -1 where the id has no content (or is 0)."""
        order = self.order
        keys = self.ids[order]
        item_ids = np.asarray(item_ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(keys, item_ids), keys.size - 1)
        return np.where((keys[pos] == item_ids) & (item_ids != 0), order[pos], -1)

    def standardized(self, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), D]: (vectors[rows] - mean) / scale."""
        x = np.asarray(self.vectors[np.asarray(rows)], dtype=np.float64)
        return ((x - self.mean) / self.scale).astype(np.float32)


def default_ids_path(content: str) -> str:
    return content[: -len(".npy")] + ".ids.npy"


def read_content(path: str, id_column: str = "205", vector_column: str = "content",
                 ids_path: Optional[str] = None) -> ContentTable:
    """Read and validate a content file in one of the layouts above."""
    if not path_manager.isfile(path):
        raise DataError(f"{path}: (file): file not found")
    if path.endswith(".npy"):
        ids, vectors = _read_npy(path, ids_path or default_ids_path(path))
    elif path.endswith(".npz"):
        ids, vectors = _read_npz(path)
    else:
        ids, vectors = _read_parquet(path, id_column, vector_column)
    if ids.size == 0:
        raise DataError(f"{path}: (file): no content vectors (0 rows)")
    _check_ids(path, id_column, ids)
    mean, scale = _check_values_and_stats(path, vector_column, ids, vectors)
    return ContentTable(path, ids, vectors, mean, scale)


def _read_parquet(path: str, id_column: str, vector_column: str) -> Tuple[np.ndarray, np.ndarray]:
    with path_manager.open(path, "rb") as handle:
        pf = open_parquet(handle, path)
        schema = pf.schema_arrow
        for name in (id_column, vector_column):
            if name not in schema.names:
                raise DataError(f"{path}: {name}: column missing (columns: {', '.join(schema.names)}; "
                                f"see --id-column / --vector-column)")
        id_type, vec_type = schema.field(id_column).type, schema.field(vector_column).type
        if not pa.types.is_integer(id_type):
            raise DataError(f"{path}: {id_column}: type {id_type}, expected an integer item id")
        is_list = pa.types.is_list(vec_type) or pa.types.is_large_list(vec_type) or pa.types.is_fixed_size_list(vec_type)
        if not is_list or not (pa.types.is_floating(vec_type.value_type) or pa.types.is_integer(vec_type.value_type)):
            raise DataError(f"{path}: {vector_column}: type {vec_type}, expected a list of numbers")
        n = pf.metadata.num_rows
        ids = np.empty(n, np.int64)
        vectors: Optional[np.ndarray] = None
        start = 0
        try:
            for group in range(pf.metadata.num_row_groups):
                for batch in pf.iter_batches(batch_size=_CHUNK_ROWS, row_groups=[group], columns=[id_column, vector_column]):
                    rows = batch.num_rows
                    id_arr, vec_arr = batch.column(id_column), batch.column(vector_column)
                    if id_arr.null_count or vec_arr.null_count:
                        bad = id_column if id_arr.null_count else vector_column
                        raise DataError(f"{path}: {bad}: null values in rows {start}..{start + rows - 1}")
                    values = vec_arr.flatten()
                    if values.null_count:
                        raise DataError(f"{path}: {vector_column}: null entries in rows {start}..{start + rows - 1}")
                    lengths = np.diff(vec_arr.offsets.to_numpy()) if not pa.types.is_fixed_size_list(vec_type) \
                        else np.full(rows, vec_type.list_size)
                    if vectors is None:
                        if rows == 0:
                            continue
                        vectors = np.empty((n, int(lengths[0])), np.float32)
                    width = vectors.shape[1]
                    bad = np.flatnonzero(lengths != width)
                    if bad.size:
                        r = int(bad[0])
                        raise DataError(f"{path}: {vector_column}: row {start + r} has {int(lengths[r])} values, "
                                        f"but row 0 has {width} (mismatched widths)")
                    if width == 0:
                        raise DataError(f"{path}: {vector_column}: vectors of 0 values")
                    ids[start:start + rows] = id_arr.to_numpy().astype(np.int64)
                    vectors[start:start + rows] = values.to_numpy(zero_copy_only=False).reshape(rows, width)
                    start += rows
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path}: (file): cannot read near row {start} (truncated or corrupt?): "
                            f"{one_line(err)}") from None
    if vectors is None:
        return np.empty(0, np.int64), np.empty((0, 0), np.float32)
    return ids, vectors


def _load_array(path: str, what: str, mmap: bool) -> np.ndarray:
    if not path_manager.isfile(path):
        raise DataError(f"{path}: (file): file not found ({what})")
    try:
        return np.load(path_manager.get_local_path(path), mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path}: (file): not a readable .npy file ({what}): {one_line(err)}") from None


def _check_arrays(path: str, ids: np.ndarray, vectors: np.ndarray, ids_name: str) -> Tuple[np.ndarray, np.ndarray]:
    if vectors.ndim != 2 or vectors.shape[1] == 0 or not (np.issubdtype(vectors.dtype, np.floating) or np.issubdtype(vectors.dtype, np.integer)):
        raise DataError(f"{path}: vectors: shape {vectors.shape} of {vectors.dtype}, expected a 2-D numeric array [N, D]")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{ids_name}: ids: shape {ids.shape} of {ids.dtype}, expected a 1-D integer array [N]")
    if ids.shape[0] != vectors.shape[0]:
        raise DataError(f"{ids_name}: ids: {ids.shape[0]} ids for the {vectors.shape[0]} vectors of {path}")
    return np.asarray(ids, dtype=np.int64), vectors


def _read_npy(path: str, ids_path: str) -> Tuple[np.ndarray, np.ndarray]:
    vectors = _load_array(path, "content vectors", mmap=True)
    ids = _load_array(ids_path, f"item ids of {os.path.basename(path)}; see --content-ids", mmap=False)
    return _check_arrays(path, ids, vectors, ids_path)


def _read_npz(path: str) -> Tuple[np.ndarray, np.ndarray]:
    archive = _load_array(path, "content ids and vectors", mmap=False)
    try:
        if not hasattr(archive, "files") or {"ids", "vectors"} - set(archive.files):
            raise DataError(f"{path}: (file): expected arrays 'ids' and 'vectors'")
        return _check_arrays(path, archive["ids"], archive["vectors"], path)
    finally:
        if hasattr(archive, "close"):
            archive.close()


def _check_ids(path: str, column: str, ids: np.ndarray) -> None:
    zero = np.flatnonzero(ids == 0)
    if zero.size:
        raise DataError(f"{path}: {column}: row {int(zero[0])} has item id 0 (0 is padding)")
    keys = np.sort(ids)
    dup = np.flatnonzero(keys[1:] == keys[:-1])
    if dup.size:
        raise DataError(f"{path}: {column}: item id {int(keys[dup[0]])} has more than one content vector")


def _check_values_and_stats(path: str, column: str, ids: np.ndarray, vectors: np.ndarray) -> Tuple[np.ndarray, float]:
    """NaN/inf check and the standardization (mean [D], global RMS scale), chunk by chunk in float64."""
    n, width = vectors.shape
    total = np.zeros(width, np.float64)
    for start in range(0, n, _CHUNK_ROWS):
        chunk = np.asarray(vectors[start:start + _CHUNK_ROWS], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(chunk).all(axis=1))
        if bad.size:
            r = start + int(bad[0])
            raise DataError(f"{path}: {column}: row {r} (item {int(ids[r])}) has NaN or infinite values "
                            f"({bad.size} such rows in rows {start}..{min(n, start + _CHUNK_ROWS) - 1})")
        total += chunk.sum(axis=0)
    mean = total / n
    square = 0.0
    for start in range(0, n, _CHUNK_ROWS):
        chunk = np.asarray(vectors[start:start + _CHUNK_ROWS], dtype=np.float64) - mean
        square += float((chunk * chunk).sum())
    scale = float(np.sqrt(square / (n * width)))
    return mean, scale if scale > 0 else 1.0


def check_catalogue(content: ContentTable, raw_dir: str, id_column: str, missing_content: str) -> Tuple[int, int]:
    """Every item of the release's ``item_features.parquet`` must have a content vector (``missing_content``
    ``error``), or is left out of the table (``skip``). Returns (catalogue items, items without content)."""
    rf = RawFile(raw_dir, S.ITEM_FEATURES)
    try:
        total = missing = 0
        first = None
        for batch in rf.batches([S.ITEM]):
            items = batch[S.ITEM]
            lacking = items[content.rows(items) < 0]
            total += int(items.size)
            missing += int(lacking.size)
            if first is None and lacking.size:
                first = int(lacking[0])
    finally:
        rf.close()
    if missing and missing_content == "error":
        raise DataError(f"{content.path}: {id_column}: {missing} of the {total} items of {rf.path} have no content vector "
                        f"(first: item {first}); pass --missing-content skip to leave them out of the table")
    return total, missing
