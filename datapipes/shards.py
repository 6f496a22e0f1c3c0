"""Writing prepared sample shards (fixed row count) and the hash-partitioned spill that groups samples by user."""

import glob
import os
from typing import List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.io import path_manager

# One prepared sample: remapped indices (0 = padding/unknown). Its history is the user's in the split's history
# store (``datapipes.histories``): ``user`` is the key, ``history_end`` how many of its entries the sample sees
# (-1 = all).
SHARD_SCHEMA = pa.schema(
    [("label", pa.int8()), ("user", pa.int64()), ("target_item", pa.int64()), ("target_cat", pa.int64()),
     ("item_city", pa.int64()), ("item_province", pa.int64()), ("history_end", pa.int64())])
# Rows per parquet row group of the sample shards (~450 KB decoded).
SAMPLE_GROUP_ROWS = 8192

# The samples as spilled by user bucket, after remapping.
SAMPLE_SCHEMA = pa.schema([("label", pa.int8()), ("user", pa.int64()), ("target_item", pa.int64())])


def row_group_rows(max_seq_len: int, budget_bytes: int = 32 << 20) -> int:
    """Rows per shuffle chunk of the reader (and per row group of the per-sample-history layout it replaced):
    about ``budget_bytes`` of padded histories of ``max_seq_len``. The reader keeps this unit, so a dataset gets
    the same shuffled order from the same seed as it had in that layout."""
    return int(np.clip(budget_bytes // (8 * max(1, max_seq_len) + 96), 8, 8192))


class ShardWriter:
    """Appends tables to ``<root>/<split>/part-NNNNN.parquet`` files of exactly ``shard_rows`` rows
    (the last one may be shorter)."""

    def __init__(self, root: str, split: str, shard_rows: int, group_rows: int):
        self.root, self.split = root, split
        self.shard_rows, self.group_rows = shard_rows, group_rows
        self.shards: List[Tuple[str, int]] = []
        self._writer = None
        self._file = None
        self._rows = 0
        path_manager.mkdirs(os.path.join(root, split))

    def _open(self) -> None:
        rel = f"{self.split}/part-{len(self.shards):05d}.parquet"
        self._file = path_manager.open(os.path.join(self.root, rel), "wb")
        self._writer = pq.ParquetWriter(self._file, SHARD_SCHEMA)
        self.shards.append((rel, 0))
        self._rows = 0

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            rel, _ = self.shards[-1]
            self.shards[-1] = (rel, self._rows)
            self._writer = self._file = None

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None:
                self._open()
            piece = table.slice(0, self.shard_rows - self._rows)
            self._writer.write_table(piece, row_group_size=self.group_rows)
            self._rows += piece.num_rows
            table = table.slice(piece.num_rows)
            if self._rows == self.shard_rows:
                self._close_current()

    def close(self) -> List[Tuple[str, int]]:
        """Relative shard paths and their row counts."""
        self._close_current()
        return self.shards


class BucketSpill:
    """Hash-partitioned spill of a table stream into ``buckets`` groups of parquet files (local scratch).

    Rows are buffered per bucket and written as a new file once ``flush_rows`` accumulate, so memory is
    bounded by buckets x flush_rows rows and no file handle stays open.
    """

    def __init__(self, workdir: str, name: str, buckets: int, schema: pa.Schema, flush_rows: int):
        self.workdir, self.name, self.buckets, self.schema = workdir, name, buckets, schema
        self.flush_rows = max(1, flush_rows)
        self._buffer: List[List[pa.Table]] = [[] for _ in range(buckets)]
        self._buffered = [0] * buckets
        self._files = [0] * buckets

    def add(self, table: pa.Table, bucket: np.ndarray) -> None:
        if self.buckets == 1:
            self._append(0, table)
            return
        order = np.argsort(bucket, kind="stable")
        table = table.take(pa.array(order))
        bounds = np.searchsorted(bucket[order], np.arange(self.buckets + 1))
        for b in np.flatnonzero(np.diff(bounds)):
            self._append(int(b), table.slice(int(bounds[b]), int(bounds[b + 1] - bounds[b])))

    def _append(self, b: int, table: pa.Table) -> None:
        self._buffer[b].append(table)
        self._buffered[b] += table.num_rows
        if self._buffered[b] >= self.flush_rows:
            self._flush(b)

    def _flush(self, b: int) -> None:
        if not self._buffer[b]:
            return
        path = os.path.join(self.workdir, f"{self.name}-{b:05d}-{self._files[b]:06d}.parquet")
        pq.write_table(pa.concat_tables(self._buffer[b]), path)
        self._files[b] += 1
        self._buffer[b], self._buffered[b] = [], 0

    def close(self) -> None:
        for b in range(self.buckets):
            self._flush(b)

    def read(self, b: int) -> pa.Table:
        """All rows of bucket ``b`` (file order, then row order), then deletes its files."""
        paths = sorted(glob.glob(os.path.join(self.workdir, f"{self.name}-{b:05d}-*.parquet")))
        if not paths:
            return self.schema.empty_table()
        table = pa.concat_tables([pq.read_table(p) for p in paths]).combine_chunks()
        for p in paths:
            os.remove(p)
        return table
