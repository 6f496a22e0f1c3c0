"""Frequency counting of hashed ids with memory bounded by a budget, not by the data size.

Each chunk is reduced with ``np.unique`` and its (id, count) pairs are hash-partitioned; when the
buffered pairs exceed the budget, every partition is merged and spilled to a ``.npy`` file, and a
partition's files are compacted into one once there are several, so a partition never holds more
than a few times its distinct ids. At the end a partition is merged from its files (one partition in
memory at a time).
"""

import os
from typing import Iterator, List, Tuple

import numpy as np

_COMPACT_FILES = 8  # a partition with this many spill files is merged into one
Counts = Tuple[np.ndarray, np.ndarray]  # (sorted unique int64 ids, int64 counts)


def partition_of(ids: np.ndarray, partitions: int) -> np.ndarray:
    """A well-mixed partition index in [0, partitions) for int64 ids (multiplicative hashing)."""
    mixed = ids.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed >> np.uint64(33)) % np.uint64(partitions)).astype(np.int64)


def merge_counts(parts: List[Counts]) -> Counts:
    """Sum counts of equal ids over several (ids, counts) pairs; result sorted by id."""
    parts = [p for p in parts if p[0].size]
    if not parts:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if len(parts) == 1:
        return parts[0]
    ids = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    order = np.argsort(ids, kind="stable")
    ids, counts = ids[order], counts[order]
    starts = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]]))
    return ids[starts], np.add.reduceat(counts, starts)


class IdCounter:
    """Counts nonzero int64 ids; ``partitions()`` yields each partition's merged (ids, counts)."""

    def __init__(self, workdir: str, name: str, partitions: int = 16, budget_pairs: int = 8_000_000):
        self.workdir, self.name = workdir, name
        self.n_partitions, self.budget = partitions, budget_pairs
        self._memory: List[List[Counts]] = [[] for _ in range(partitions)]
        self._files: List[List[str]] = [[] for _ in range(partitions)]
        self._buffered = 0
        self._serial = 0
        self.total = 0

    def add(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[ids != 0]
        if ids.size == 0:
            return
        self.total += int(ids.size)
        uniq, counts = np.unique(ids, return_counts=True)
        counts = counts.astype(np.int64)
        if self.n_partitions == 1:
            self._memory[0].append((uniq, counts))
        else:
            part = partition_of(uniq, self.n_partitions)
            order = np.argsort(part, kind="stable")
            bounds = np.searchsorted(part[order], np.arange(self.n_partitions + 1))
            for p in range(self.n_partitions):
                sel = order[bounds[p]:bounds[p + 1]]
                if sel.size:
                    self._memory[p].append((uniq[sel], counts[sel]))
        self._buffered += int(uniq.size)
        if self._buffered > self.budget:
            self._spill()

    def _spill(self) -> None:
        for p in range(self.n_partitions):
            if self._memory[p]:
                self._files[p].append(self._save(p, merge_counts(self._memory[p])))
                self._memory[p] = []
                if len(self._files[p]) >= _COMPACT_FILES:
                    self._compact(p)
        self._buffered = 0

    def _save(self, p: int, counts: Counts) -> str:
        self._serial += 1
        path = os.path.join(self.workdir, f"count-{self.name}-{p}-{self._serial}.npy")
        np.save(path, np.stack(counts))
        return path

    def _compact(self, p: int) -> None:
        """Merge a partition's spill files into one (bounded by the partition's distinct ids)."""
        parts = []
        for path in self._files[p]:
            arr = np.load(path)
            parts.append((arr[0], arr[1]))
            os.remove(path)
        self._files[p] = [self._save(p, merge_counts(parts))]

    def partition(self, p: int) -> Counts:
        """Merged (ids, counts) of partition ``p``; spilled partitions are compacted to one file."""
        parts = list(self._memory[p])
        for path in self._files[p]:
            arr = np.load(path)
            parts.append((arr[0], arr[1]))
        merged = merge_counts(parts)
        if self._files[p]:
            for path in self._files[p]:
                os.remove(path)
            self._files[p], self._memory[p] = [self._save(p, merged)], []
        else:
            self._memory[p] = [merged]
        return merged

    def partitions(self) -> Iterator[Counts]:
        for p in range(self.n_partitions):
            yield self.partition(p)
