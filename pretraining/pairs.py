"""Positive pairs for the contrastive pretraining, as rows of the content table (int64 [P, 2]).

- I2I (``mine_i2i``): every user's behavior sequence in ``train_user_features.parquet``, padding (item 0)
  removed, oldest -> newest; a pair is (x[t], x[t + d]) for 1 <= d <= window within one user's sequence, of
  two different items that both have content vectors. An item without content still takes its position
  (the window counts behaviors), only its pairs are dropped.
- SCL (``read_scl_pairs``): the rows (``query_item``, ``item``) of a pairs parquet (search query item ->
  purchased item), both int64 item ids.

Memory stays bounded: the raw file is streamed in row-group batches, and the kept pairs are a uniform sample
of at most ``max_pairs`` (bottom-k of a seeded 64-bit hash of each candidate's position in the file), so the
sample and its order depend only on the data, the window and the seed, never on batch boundaries.
"""

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import pyarrow as pa

from common.errors import DataError
from common.io import path_manager
from datapipes import schema as S
from datapipes.rawread import RawFile, one_line, open_parquet
from pretraining.content import ContentTable

PAIRS_QUERY = "query_item"
PAIRS_ITEM = "item"
_BATCH_ROWS = 65536
_HISTORY_BATCH_BYTES = 16 << 20   # raw history values per batch: the per-offset candidate arrays are a few times this


@dataclass
class PairStats:
    """Counts of one mining pass: every candidate is same-item, lacks content, or is usable; ``kept`` <= max_pairs."""

    source: str
    candidates: int = 0
    same_item: int = 0
    missing_content: int = 0
    usable: int = 0
    kept: int = 0


def splitmix64(x: np.ndarray) -> np.ndarray:
    """uint64 [n]: the splitmix64 finalizer of each value (a bijection that scatters nearby inputs)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _priority(keys: np.ndarray, seed: int) -> np.ndarray:
    salt = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    return splitmix64(np.asarray(keys).astype(np.uint64) ^ salt)


class BottomK:
    """The ``capacity`` pairs of smallest priority seen so far; memory at most ~2 x capacity plus one batch."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._priority: List[np.ndarray] = []
        self._pairs: List[np.ndarray] = []
        self._pending = 0
        self._threshold = None

    def add(self, priority: np.ndarray, pairs: np.ndarray) -> None:
        """priority uint64 [n], pairs int64 [n, 2]."""
        if self._threshold is not None:
            keep = priority < self._threshold
            priority, pairs = priority[keep], pairs[keep]
        if priority.size == 0:
            return
        self._priority.append(priority)
        self._pairs.append(pairs)
        self._pending += priority.size
        if self._pending >= 2 * self.capacity:
            self._compact()

    def _compact(self) -> None:
        p = np.concatenate(self._priority) if self._priority else np.empty(0, np.uint64)
        q = np.concatenate(self._pairs) if self._pairs else np.empty((0, 2), np.int64)
        if p.size > self.capacity:
            sel = np.argpartition(p, self.capacity - 1)[: self.capacity]
            p, q = p[sel], q[sel]
            self._threshold = p.max()
        self._priority, self._pairs, self._pending = [p], [q], p.size

    def result(self) -> np.ndarray:
        """int64 [k, 2], ordered by priority (then pair): canonical for the same candidates."""
        self._compact()
        p, q = self._priority[0], self._pairs[0]
        return q[np.lexsort((q[:, 1], q[:, 0], p))]


def window_candidates(items: np.ndarray, rows: np.ndarray, user: np.ndarray, position: np.ndarray, window: int,
                      seed: int, reservoir: BottomK, stats: PairStats) -> None:
    """Offer every in-window pair of one batch of behaviors to ``reservoir``.

    items, rows, user, position: [n] per behavior (padding removed, users' sequences contiguous and in order):
    raw item id, content row (-1: none), user of the batch, global position among all behaviors of the file.
    """
    for d in range(1, window + 1):
        if items.size <= d:
            break
        same_user = user[d:] == user[:-d]
        _offer(items[:-d][same_user], items[d:][same_user], rows[:-d][same_user], rows[d:][same_user],
               position[:-d][same_user] * window + (d - 1), seed, reservoir, stats)


def _offer(item_a: np.ndarray, item_b: np.ndarray, row_a: np.ndarray, row_b: np.ndarray, keys: np.ndarray,
           seed: int, reservoir: BottomK, stats: PairStats) -> None:
    """Count candidate pairs [n] (raw item ids, content rows with -1 for none, unique int64 keys) as same-item,
    missing content or usable, and offer the usable ones to ``reservoir`` by the seeded priority of their key."""
    same = item_a == item_b
    missing = ~same & ((row_a < 0) | (row_b < 0))
    ok = ~same & ~missing
    stats.candidates += int(item_a.size)
    stats.same_item += int(same.sum())
    stats.missing_content += int(missing.sum())
    stats.usable += int(ok.sum())
    reservoir.add(_priority(keys[ok], seed), np.stack([row_a[ok], row_b[ok]], axis=1))


def mine_i2i(raw_dir: str, content: ContentTable, window: int, max_pairs: int, seed: int) -> Tuple[np.ndarray, PairStats]:
    """I2I pairs from the train histories (see the module docstring)."""
    rf = RawFile(raw_dir, S.TRAIN_USER_FEATURES)
    stats = PairStats(source=rf.path)
    reservoir = BottomK(max_pairs)
    seen = 0
    try:
        rows = max(1, int(_HISTORY_BATCH_BYTES / max(1.0, rf.bytes_per_row([S.HIST_ITEMS]))))
        for batch in rf.batches([S.HIST_ITEMS], max_rows=rows):
            hist = batch[S.HIST_ITEMS]
            real = hist.values != 0
            items = hist.values[real].astype(np.int64)
            user = np.repeat(np.arange(hist.lengths.size), hist.lengths)[real]
            position = seen + np.arange(items.size, dtype=np.int64)
            seen += items.size
            window_candidates(items, content.rows(items), user, position, window, seed, reservoir, stats)
    finally:
        rf.close()
    if stats.usable == 0:
        raise DataError(f"{rf.path}: {S.HIST_ITEMS}: no I2I pair within --window {window} has two different items "
                        f"with content vectors ({stats.candidates} candidates, {stats.same_item} same-item, "
                        f"{stats.missing_content} without content)")
    pairs = reservoir.result()
    stats.kept = int(pairs.shape[0])
    return pairs, stats


def read_scl_pairs(path: str, content: ContentTable, max_pairs: int, seed: int) -> Tuple[np.ndarray, PairStats]:
    """SCL pairs from a parquet of int64 columns ``query_item`` and ``item``, streamed by row group."""
    stats = PairStats(source=path)
    reservoir = BottomK(max_pairs)
    with path_manager.open(path, "rb") as handle:
        pf = open_parquet(handle, path)
        schema = pf.schema_arrow
        for name in (PAIRS_QUERY, PAIRS_ITEM):
            if name not in schema.names:
                raise DataError(f"{path}: {name}: column missing (a pairs file has int64 columns {PAIRS_QUERY}, {PAIRS_ITEM})")
            if not pa.types.is_integer(schema.field(name).type):
                raise DataError(f"{path}: {name}: type {schema.field(name).type}, expected an integer item id")
        if pf.metadata.num_rows == 0:
            raise DataError(f"{path}: (file): empty pairs file (0 rows)")
        start = 0
        try:
            for group in range(pf.metadata.num_row_groups):
                for batch in pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=[group], columns=[PAIRS_QUERY, PAIRS_ITEM]):
                    for name in (PAIRS_QUERY, PAIRS_ITEM):
                        if batch.column(name).null_count:
                            raise DataError(f"{path}: {name}: null values in rows {start}..{start + batch.num_rows - 1}")
                    query = batch.column(PAIRS_QUERY).to_numpy().astype(np.int64)
                    item = batch.column(PAIRS_ITEM).to_numpy().astype(np.int64)
                    keys = start + np.arange(query.size, dtype=np.int64)
                    _offer(query, item, content.rows(query), content.rows(item), keys, seed, reservoir, stats)
                    start += batch.num_rows
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path}: (file): cannot read near row {start} (truncated or corrupt?): "
                            f"{one_line(err)}") from None
    if stats.usable == 0:
        raise DataError(f"{path}: {PAIRS_QUERY}: none of the {stats.candidates} pairs has two different items with "
                        f"content vectors ({stats.same_item} same-item, {stats.missing_content} without content)")
    pairs = reservoir.result()
    stats.kept = int(pairs.shape[0])
    return pairs, stats
