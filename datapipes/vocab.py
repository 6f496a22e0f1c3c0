"""Per-id-space vocabularies: hashed int64 id -> contiguous index in [1, V]; 0 = padding/unknown.

Order is deterministic: by frequency (descending), ties by raw id (ascending). Stored as
``vocab/<space>.parquet`` with columns ``id`` (raw hashed id), ``index`` (1..V) and ``count``.
"""

import hashlib
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.io import path_manager
from datapipes.counting import IdCounter, merge_counts

VOCAB_SCHEMA = pa.schema([("id", pa.int64()), ("index", pa.int64()), ("count", pa.int64())])


@dataclass
class Vocab:
    """``ids[i]`` is the raw id of index ``i + 1``; ``counts[i]`` its frequency when the vocab was built."""

    ids: np.ndarray
    counts: np.ndarray
    _sorted: Optional[Tuple[np.ndarray, np.ndarray]] = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return int(self.ids.size)

    def lookup(self, raw: np.ndarray) -> np.ndarray:
        """int64 indices (same shape as ``raw``): the vocab index of each raw id, 0 where unknown or 0."""
        if self._sorted is None:
            order = np.argsort(self.ids, kind="stable")
            self._sorted = (self.ids[order], order.astype(np.int64) + 1)
        keys, index = self._sorted
        raw = np.asarray(raw, dtype=np.int64)
        if keys.size == 0:
            return np.zeros(raw.shape, np.int64)
        pos = np.minimum(np.searchsorted(keys, raw), keys.size - 1)
        return np.where(keys[pos] == raw, index[pos], 0)

    def write(self, path: str) -> None:
        table = pa.table({"id": self.ids, "index": np.arange(1, self.size + 1, dtype=np.int64), "count": self.counts},
                         schema=VOCAB_SCHEMA)
        with path_manager.open(path, "wb") as f:
            pq.write_table(table, f)

    @classmethod
    def read(cls, path: str) -> "Vocab":
        with path_manager.open(path, "rb") as f:
            table = pq.read_table(f)
        index = table.column("index").to_numpy()
        order = np.argsort(index)
        return cls(table.column("id").to_numpy()[order], table.column("count").to_numpy()[order])


def _ordered(ids: np.ndarray, counts: np.ndarray) -> Vocab:
    order = np.lexsort((ids, -counts))
    return Vocab(ids[order], counts[order])


def vocab_from_counter(counter: IdCounter) -> Vocab:
    """Every counted id, most frequent first."""
    ids, counts = merge_counts(list(counter.partitions()))
    return _ordered(ids, counts)


def coverage_threshold(history: IdCounter, coverage: float) -> Tuple[int, float]:
    """Smallest count t such that ids counted >= t times cover at least ``coverage`` of all history
    interactions (ties at t are all kept). Returns (t, achieved coverage); t = 1 keeps everything."""
    hist: Dict[int, int] = {}
    for _, counts in history.partitions():
        values, multiplicity = np.unique(counts, return_counts=True)
        for v, m in zip(values.tolist(), multiplicity.tolist()):
            hist[v] = hist.get(v, 0) + m
    total = sum(v * m for v, m in hist.items())
    if total == 0 or coverage >= 1.0:
        return 1, 1.0
    covered = 0
    for v in sorted(hist, reverse=True):
        covered += v * hist[v]
        if covered >= coverage * total:
            return v, covered / total
    return 1, 1.0


def item_vocab(history: IdCounter, targets: IdCounter, coverage: float) -> Tuple[Vocab, Dict[str, float]]:
    """Items covering ``coverage`` of history interactions plus every target item (the release's "p90"
    rule at coverage 0.9). Frequency = history count + target count. Both counters share partitioning."""
    threshold, achieved = coverage_threshold(history, coverage)
    kept_ids, kept_counts = [], []
    hist_distinct = 0
    for (h_ids, h_counts), (t_ids, t_counts) in zip(history.partitions(), targets.partitions()):
        hist_distinct += h_ids.size
        ids, counts = merge_counts([(h_ids, h_counts), (t_ids, t_counts)])
        in_hist = np.zeros(ids.size, bool)
        pos = np.searchsorted(ids, h_ids)
        in_hist[pos] = h_counts >= threshold
        keep = in_hist | np.isin(ids, t_ids, assume_unique=True)
        kept_ids.append(ids[keep])
        kept_counts.append(counts[keep])
    vocab = _ordered(np.concatenate(kept_ids), np.concatenate(kept_counts))
    stats = {"requested": coverage, "count_threshold": int(threshold), "history_coverage": round(achieved, 6),
             "history_items_distinct": int(hist_distinct), "items_kept": vocab.size}
    return vocab, stats


def fingerprint(vocabs: Mapping[str, Vocab]) -> str:
    """sha256 of every vocabulary's raw ids in index order (spaces sorted by name): two datasets share it exactly
    when every id maps to the same index, so index-level data (history stores, retrievals) carries over."""
    digest = hashlib.sha256()
    for space in sorted(vocabs):
        digest.update(space.encode() + b"\0" + np.ascontiguousarray(vocabs[space].ids, dtype="<i8").tobytes())
    return digest.hexdigest()
