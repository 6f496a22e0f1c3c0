"""Validated, streaming access to one raw Taobao-MM parquet file.

Every problem becomes a ``DataError`` with one line ``FILE: COLUMN: problem``: a missing file, a file
that is not readable parquet (truncated, corrupt), an empty file, a missing or mistyped column, nulls,
lists of the wrong length, labels that are not one-hot.
"""

import hashlib
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import DataError
from common.io import path_manager
from datapipes import schema as S

FILE_LEVEL = "(file)"
# Target decoded size of one record batch; rows per batch follow from the file's bytes per row.
_BATCH_BYTES = 64 << 20
_PHYSICAL_WIDTH = {"INT64": 8, "INT32": 4, "DOUBLE": 8, "FLOAT": 4, "BOOLEAN": 1}


@dataclass
class ListColumn:
    """A list column of one record batch: row i is ``values[offsets[i]:offsets[i+1]]`` (offsets start at 0)."""

    offsets: np.ndarray  # int64 [n+1]
    values: np.ndarray   # [offsets[-1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


Column = Union[np.ndarray, ListColumn]


def one_line(err: BaseException) -> str:
    """An exception's message on one line (at most 300 characters), for a user-facing error."""
    text = " ".join(str(err).split())
    return text[:300] or type(err).__name__


def open_parquet(handle, path: str) -> pq.ParquetFile:
    """The parquet file behind the open binary ``handle``; an unreadable one is a one-line DataError naming ``path``."""
    try:
        return pq.ParquetFile(handle)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: {FILE_LEVEL}: not a readable parquet file (truncated or corrupt?): {one_line(err)}") from None


def _list_parts(arr: pa.Array) -> ListColumn:
    if pa.types.is_fixed_size_list(arr.type):
        n, width = len(arr), arr.type.list_size
        values = arr.flatten().to_numpy(zero_copy_only=False)
        return ListColumn(np.arange(n + 1, dtype=np.int64) * width, values)
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    return ListColumn(offsets - offsets[0], values)


def _type_matches(actual: pa.DataType, expected: S.ColumnType) -> bool:
    if expected.is_list:
        is_list = pa.types.is_list(actual) or pa.types.is_large_list(actual) or pa.types.is_fixed_size_list(actual)
        return is_list and actual.value_type == expected.base
    return actual == expected.base


class RawFile:
    """One raw file of the release, opened and schema-checked; ``batches`` streams validated columns."""

    def __init__(self, raw_dir: str, filename: str):
        self.filename = filename
        self.path = os.path.join(raw_dir, filename)
        self.expected = S.SCHEMAS[filename]
        if not path_manager.exists(self.path):
            raise DataError(f"{self.path}: {FILE_LEVEL}: file not found")
        try:
            self._handle = path_manager.open(self.path, "rb")
        except OSError as err:
            raise DataError(f"{self.path}: {FILE_LEVEL}: not a readable parquet file (truncated or corrupt?): {one_line(err)}") from None
        self._pf = open_parquet(self._handle, self.path)
        schema = self._pf.schema_arrow
        for name, col in self.expected.items():
            if name not in schema.names:
                raise DataError(f"{self.path}: {name}: column missing (expected {col.describe()})")
            if schema.names.count(name) > 1:
                raise DataError(f"{self.path}: {name}: duplicate column ({schema.names.count(name)} columns of that name)")
            actual = schema.field(name).type
            if not _type_matches(actual, col):
                raise DataError(f"{self.path}: {name}: type {actual}, expected {col.describe()}")
        if self.num_rows == 0:
            raise DataError(f"{self.path}: {FILE_LEVEL}: empty file (0 rows)")

    @property
    def num_rows(self) -> int:
        return self._pf.metadata.num_rows

    def bytes_per_row(self, columns: Sequence[str]) -> float:
        """Decoded bytes per row of ``columns``, from the footer's value counts (not the encoded sizes,
        which dictionary encoding shrinks)."""
        meta = self._pf.metadata
        names = set(columns)
        total = 0
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                if col.path_in_schema.split(".")[0] in names:
                    width = _PHYSICAL_WIDTH.get(col.physical_type)
                    total += col.num_values * width if width else col.total_uncompressed_size
        return total / max(1, self.num_rows)

    def close(self) -> None:
        self._handle.close()

    def fail(self, column: str, problem: str) -> DataError:
        return DataError(f"{self.path}: {column}: {problem}")

    def batches(self, columns: Sequence[str], max_rows: int = 65536) -> Iterator[Dict[str, Column]]:
        """Yield dicts column -> np.ndarray (scalars) or ListColumn, validated, ``max_rows`` rows at most."""
        rows = int(max(1, min(max_rows, _BATCH_BYTES / max(1.0, self.bytes_per_row(columns)))))
        start = 0
        for group in range(self._pf.metadata.num_row_groups):
            iterator = self._pf.iter_batches(batch_size=rows, row_groups=[group], columns=list(columns))
            while True:
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                except (pa.ArrowException, OSError) as err:
                    raise self._read_failure(group, columns, start, err) from None
                yield {name: self._column(batch.column(name), name, start) for name in columns}
                start += batch.num_rows

    def _read_failure(self, group: int, columns: Sequence[str], start: int, err: BaseException) -> DataError:
        """Name the damaged column by reading the failing row group one column at a time."""
        for name in columns:
            try:
                self._pf.read_row_group(group, columns=[name])
            except (pa.ArrowException, OSError) as col_err:
                return self.fail(name, f"cannot read row group {group} (truncated or corrupt?): {one_line(col_err)}")
        return self.fail(FILE_LEVEL, f"cannot read parquet near row {start} (truncated or corrupt?): {one_line(err)}")

    def _column(self, arr: pa.Array, name: str, start: int) -> Column:
        spec = self.expected[name]
        if arr.null_count:
            row = start + int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
            raise self.fail(name, f"{arr.null_count} null values (first at row {row})")
        if not spec.is_list:
            return arr.to_numpy()
        parts = _list_parts(arr)
        flat = arr.flatten()
        if flat.null_count:
            row = start + int(np.searchsorted(parts.offsets, np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0], side="right") - 1)
            raise self.fail(name, f"{flat.null_count} null list entries (first in row {row})")
        if spec.length:
            bad = np.flatnonzero(parts.lengths != spec.length)
            if bad.size:
                raise self.fail(name, f"row {start + int(bad[0])} has {int(parts.lengths[bad[0]])} values, expected {spec.length} ({bad.size} such rows in this batch of {len(parts.lengths)})")
        if name == S.LABEL:
            pairs = parts.values.reshape(-1, S.LABEL_WIDTH).astype(np.int64)
            bad = np.flatnonzero(((pairs != 0) & (pairs != 1)).any(axis=1) | (pairs.sum(axis=1) != 1))
            if bad.size:
                raise self.fail(name, f"row {start + int(bad[0])} is {pairs[bad[0]].tolist()}, expected one-hot [1, 0] or [0, 1]")
        return parts


def sha256_file(path: str, block: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with path_manager.open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()
