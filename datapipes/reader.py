"""Per-rank streaming of a prepared split as ``SampleBatch`` (or ``transform(SampleBatch)``) batches.

A sample row is small (its user, target, label; the history stays in the split's history store, which the
transform reads: ``datapipes.histories.HistoryGather`` for the online GSU, ``retrieval.RetrievedStage`` for a
stored retrieval), so the reader never decodes a history.

Splitting (row level, so any world size up to the row count works and every rank runs the same
number of steps, which collective-based training needs):
- Each epoch the split's rows are cut into chunks (one parquet row group's worth, within one shard);
  with ``shuffle`` the chunk order is permuted (same permutation on every rank: seed, epoch).
- The concatenated chunk stream is cut into ``world_size`` equal contiguous ranges of
  ``rows // world_size`` rows (the remainder, fewer than ``world_size`` rows, is skipped unless
  ``drop_remainder=False``).
- A rank's range is cut into batches; DataLoader worker w streams a contiguous run of those batches,
  reading its rows into a shuffle buffer, permuting it with an RNG derived from
  (seed, epoch, rank, worker, buffer index), and slicing batches (optionally keeping each user's rows
  together: ``group_users``). DataLoader interleaves workers round robin, so the order is deterministic for
  a given (seed, world_size, batch_size, num_workers).
Resume: ``state_dict()`` holds (epoch, batches consumed); ``load_state_dict`` makes the next
iteration skip exactly those batches (whole buffers are skipped without reading).
"""

import ctypes
import gc
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from common.errors import UserError
from common.io import path_manager
from datapipes.batch import SampleBatch
from datapipes.histories import HistoryStore
from datapipes.prepared import PreparedDataset
from datapipes.shards import row_group_rows

Piece = Tuple[int, int, int]  # (shard index, first row, end row) within one shard
_BUFFER_BYTES = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
_MMAP_MAX = 32 << 20  # blocks up to this size come from the heap (glibc's documented largest threshold)
_TRIM_BYTES = 1 << 30  # free heap kept before it is returned to the kernel


_SCALARS = ("label", "user", "target_item", "target_cat", "item_city", "item_province", "history_end")


class RowBuffer:
    """Prepared sample rows held as numpy arrays; ``batch(rows)`` gathers any subset as a ``SampleBatch`` (the
    profile comes from the split's history store, by user).

    table: sample rows (``datapipes.shards.SHARD_SCHEMA``); sample_index: int64 [rows] their rows in the split.
    """

    def __init__(self, table: pa.Table, sample_index: np.ndarray, store: HistoryStore):
        self.num_rows = table.num_rows
        self.scalars = {name: table.column(name).to_numpy() for name in _SCALARS}
        self.scalars["sample_index"] = sample_index
        self.store = store

    def batch(self, rows: np.ndarray) -> SampleBatch:
        def col(name: str) -> torch.Tensor:
            return torch.from_numpy(self.scalars[name][rows].astype(np.int64))

        user = col("user")
        return SampleBatch(
            labels=torch.from_numpy(self.scalars["label"][rows].astype(np.float32)), user_id=user,
            profile=torch.from_numpy(self.store.profile[user.numpy()].astype(np.int64)),
            target_item=col("target_item"), target_cat=col("target_cat"), item_city=col("item_city"),
            item_province=col("item_province"), history_end=col("history_end"), sample_index=col("sample_index"))


@dataclass(frozen=True)
class RankPlan:
    """What one rank reads in one epoch: pieces (in order) covering ``rows`` rows, cut into batches."""

    pieces: List[Piece]
    rows: int
    batch_size: int
    drop_last: bool

    @property
    def num_batches(self) -> int:
        return self.rows // self.batch_size if self.drop_last else -(-self.rows // self.batch_size)

    def worker_batches(self, workers: int) -> List[Tuple[int, int]]:
        """Contiguous batch ranges [b0, b1) of each worker (earlier workers get the extra batches)."""
        n = self.num_batches
        bounds = [n * w // workers for w in range(workers + 1)]
        return [(bounds[w], bounds[w + 1]) for w in range(workers)]

    def rows_of(self, b0: int, b1: int) -> Tuple[int, int]:
        return b0 * self.batch_size, min(b1 * self.batch_size, self.rows)


def plan_rank(shard_rows: List[int], rank: int, world_size: int, epoch: int, shuffle: bool, seed: int,
              chunk_rows: int, batch_size: int, drop_last: bool, drop_remainder: bool = True) -> RankPlan:
    """The pieces rank ``rank`` reads in ``epoch`` (see module docstring)."""
    chunks: List[Piece] = [(s, start, min(start + chunk_rows, n)) for s, n in enumerate(shard_rows)
                           for start in range(0, n, chunk_rows)]
    if shuffle:
        order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(chunks))
        chunks = [chunks[i] for i in order]
    total = sum(shard_rows)
    per_rank, extra = divmod(total, world_size)
    if drop_remainder:
        begin, rows = rank * per_rank, per_rank
    else:
        begin, rows = rank * per_rank + min(rank, extra), per_rank + (1 if rank < extra else 0)
    pieces: List[Piece] = []
    pos = 0
    for shard, start, end in chunks:
        lo, hi = max(begin, pos), min(begin + rows, pos + end - start)
        if lo < hi:
            pieces.append((shard, start + lo - pos, start + hi - pos))
        pos += end - start
        if pos >= begin + rows:
            break
    return RankPlan(pieces, rows, batch_size, drop_last)


def resume_point(counts: List[int], consumed: int) -> Tuple[List[int], int]:
    """After ``consumed`` batches of DataLoader's round-robin over workers holding ``counts`` batches
    (finished workers are skipped): batches delivered by each worker, and the worker whose turn is next."""
    workers = len(counts)
    done = [0] * workers
    turn = 0
    for _ in range(min(consumed, sum(counts))):
        while done[turn] >= counts[turn]:
            turn = (turn + 1) % workers
        done[turn] += 1
        turn = (turn + 1) % workers
    if sum(done) < sum(counts):
        while done[turn] >= counts[turn]:
            turn = (turn + 1) % workers
    return done, turn


class _ShardRows:
    """Reads row ranges of shard files (keeps each file open once per worker process)."""

    def __init__(self, paths: List[str]):
        self.paths = paths
        self._files: Dict[int, Tuple[object, pq.ParquetFile, np.ndarray]] = {}

    def _file(self, shard: int) -> Tuple[pq.ParquetFile, np.ndarray]:
        if shard not in self._files:
            handle = path_manager.open(self.paths[shard], "rb")
            pf = pq.ParquetFile(handle)
            meta = pf.metadata
            starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
            self._files[shard] = (handle, pf, starts)
        _, pf, starts = self._files[shard]
        return pf, starts

    def read(self, shard: int, start: int, end: int) -> pa.Table:
        """Rows [start, end) of shard ``shard``."""
        pf, starts = self._file(shard)
        g0 = int(np.searchsorted(starts, start, side="right") - 1)
        g1 = int(np.searchsorted(starts, end, side="left"))
        table = pf.read_row_groups(list(range(g0, g1)))
        return table.slice(start - int(starts[g0]), end - start)

    def close(self) -> None:
        for handle, _, _ in self._files.values():
            handle.close()
        self._files.clear()


@dataclass(frozen=True)
class _StreamSpec:
    """Everything a worker needs to produce its batches (picklable)."""

    paths: List[str]
    shard_starts: List[int]
    store: HistoryStore
    plan: RankPlan
    epoch: int
    rank: int
    seed: int
    shuffle: bool
    buffer_rows: int
    consumed: int
    transform: Optional[Callable]
    group_users: bool = False


class _RankStream(IterableDataset):
    def __init__(self, spec: _StreamSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        loader_worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:
            torch.set_num_threads(1)  # workers run side by side with the trainer; no intra-op oversubscription
            _keep_freed_memory()
        spec = self.spec
        ranges = spec.plan.worker_batches(workers)
        done, turn = resume_point([hi - lo for lo, hi in ranges], spec.consumed)
        # DataLoader asks its workers 0, 1, ... in turn: rotate so that its worker 0 is the one whose turn it is.
        worker = (loader_worker + turn) % workers
        b0, b1 = ranges[worker]
        skip_batches = done[worker]
        row_lo, row_hi = spec.plan.rows_of(b0, b1)
        bs, buf = spec.plan.batch_size, spec.buffer_rows
        skip_rows = skip_batches * bs
        first_buffer = skip_rows // buf
        reader = _ShardRows(spec.paths)

        def load(k: int) -> RowBuffer:
            table, index = self._read_rows(reader, row_lo + k * buf, min(row_lo + (k + 1) * buf, row_hi))
            return RowBuffer(table, index, spec.store)

        buffers = list(range(first_buffer, -(-(row_hi - row_lo) // buf)))
        # The next shuffle buffer is read in a thread while this one's batches are served (parquet decoding
        # releases the GIL), so a buffer boundary does not stall the stream; a worker holds at most two buffers.
        ahead = ThreadPoolExecutor(max_workers=1)
        try:
            pending = ahead.submit(load, buffers[0]) if buffers else None
            for i, k in enumerate(buffers):
                rows = pending.result()
                pending = ahead.submit(load, buffers[i + 1]) if i + 1 < len(buffers) else None
                order = np.arange(rows.num_rows)
                if spec.shuffle:
                    rng = np.random.default_rng([spec.seed, spec.epoch, spec.rank, worker, k])
                    order = user_grouped_order(rows.scalars["user"], rng) if spec.group_users else rng.permutation(rows.num_rows)
                for s in range(max(0, skip_rows - k * buf), rows.num_rows, bs):
                    picked = order[s:s + bs]
                    if picked.size < bs and spec.plan.drop_last:
                        break
                    batch = rows.batch(picked)
                    yield spec.transform(batch) if spec.transform is not None else batch
                del rows
        finally:
            ahead.shutdown(wait=True, cancel_futures=True)
            reader.close()

    def _read_rows(self, reader: _ShardRows, lo: int, hi: int) -> Tuple[pa.Table, np.ndarray]:
        """Rows [lo, hi) of this rank's piece stream, and int64 [hi - lo] their rows in the split."""
        tables, index = [], []
        pos = 0
        for shard, start, end in self.spec.plan.pieces:
            n = end - start
            a, b = max(lo, pos), min(hi, pos + n)
            if a < b:
                first, last = start + a - pos, start + b - pos
                tables.append(reader.read(shard, first, last))
                index.append(self.spec.shard_starts[shard] + np.arange(first, last, dtype=np.int64))
            pos += n
            if pos >= hi:
                break
        return pa.concat_tables(tables).combine_chunks(), np.concatenate(index)


def user_grouped_order(users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A shuffled row order of one buffer in which each user's rows are consecutive: users in random order, each
    user's rows in random order. users: [n] the rows' user ids. Batches cut from it hold few users with several
    samples each, so the GSU fetches and scores each user's history once for all of them (``cosine_topk``'s
    shared histories), at the price of batches correlated by user."""
    shuffled = rng.permutation(users.size)
    _, user_of = np.unique(users[shuffled], return_inverse=True)
    rank = rng.permutation(int(user_of.max()) + 1 if users.size else 0)[user_of]
    return shuffled[np.argsort(rank, kind="stable")]


def _keep_freed_memory() -> None:
    """In a data worker: let glibc's malloc keep freed blocks for reuse instead of returning them to the kernel.
    Every batch allocates the same large arrays (at L = 100,000: 12.8 MB per padded history column, plus the GSU's
    buffers); by default each comes from fresh mmap'd pages whose first-touch faults cost ~10x the copy itself
    (25 ms vs 2-4 ms per column measured here). The worker's resident memory stays at its peak batch instead.
    No-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES)
    except (OSError, AttributeError):
        pass


def _exit_with_parent(_worker_id: int, poll_seconds: float = 0.5) -> None:
    """DataLoader ``worker_init_fn``: end this worker at once when the process that started it dies.

    PyTorch's own watchdog leaves the worker loop when the parent is gone, but the worker then exits through
    ``multiprocessing``'s queue finalizer, which waits for its feeder thread to flush the batches still
    buffered into the result pipe. A batch sent inline is larger than a pipe's buffer, and the worker holds
    the pipe's read end too, so that write never returns: a rank killed mid-epoch (torchrun restarting it, a
    preempted host) left an orphaned worker holding the launcher's stdout open forever."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _identity(x):
    return x


class ShardedLoader:
    """Iterable over one rank's batches; each ``iter()`` continues the current epoch from the saved
    position and, once exhausted, advances the epoch. ``len()`` = batches per epoch on this rank."""

    def __init__(self, dataset_dir: str, split: str, rank: int, world_size: int, batch_size: int,
                 transform: Optional[Callable] = None, num_workers: int = 0, shuffle: bool = True, seed: int = 0,
                 max_seq_len: Optional[int] = None, drop_last: bool = False, drop_remainder: bool = True,
                 prefetch_factor: int = 2, group_users: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {num_workers}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: {rank} not in [0, world_size={world_size})")
        self.dataset = PreparedDataset.open(dataset_dir)
        info = self.dataset.split(split)
        if world_size > info.rows:
            raise UserError(f"--world-size {world_size}: larger than the {info.rows} rows of split '{split}' in {dataset_dir}")
        self.split, self.rank, self.world_size = split, rank, world_size
        self.batch_size, self.transform, self.num_workers = batch_size, transform, num_workers
        self.shuffle, self.seed, self.drop_last, self.drop_remainder = shuffle, seed, drop_last, drop_remainder
        self.max_seq_len, self.prefetch_factor, self.group_users = max_seq_len, prefetch_factor, group_users
        self.paths = self.dataset.shards(split)
        self.shard_rows = self.dataset.shard_rows(split)
        self.shard_starts = [int(v) for v in np.cumsum([0] + self.shard_rows[:-1])]
        self.store = self.dataset.histories(split)
        # Chunks and shuffle buffers keep the row counts of the per-sample-history layout (sized by the padded
        # history they carried), so the same seed gives the same batches as that layout did.
        longest = min(self.dataset.metadata.max_seq_len, max_seq_len or self.dataset.metadata.max_seq_len)
        self.chunk_rows = row_group_rows(self.dataset.metadata.max_seq_len)
        row_bytes = 8 * max(1, longest) + 96
        self.buffer_rows = batch_size * max(1, _BUFFER_BYTES // row_bytes // batch_size)
        self.epoch = 0
        self.consumed = 0

    def plan(self, epoch: Optional[int] = None) -> RankPlan:
        return plan_rank(self.shard_rows, self.rank, self.world_size, self.epoch if epoch is None else epoch,
                         self.shuffle, self.seed, self.chunk_rows, self.batch_size, self.drop_last, self.drop_remainder)

    def __len__(self) -> int:
        return self.plan(0).num_batches

    def __iter__(self) -> Iterator:
        if self.consumed >= len(self):
            self.epoch, self.consumed = self.epoch + 1, 0
        for batch in self._epoch(self.epoch, self.consumed):
            self.consumed += 1
            yield batch
        self.epoch, self.consumed = self.epoch + 1, 0

    def endless(self) -> Iterator:
        """Batches epoch after epoch from the current position, for training; the same batches in the same order
        as iterating epoch by epoch. With workers, the next epoch's workers are started early, so that their
        start (fork, first shuffle buffer, first transform) overlaps the trainer's last steps of the current
        epoch instead of stalling it at every boundary: once no more than ``prefetch_factor`` batches per worker
        are left, or earlier, once the time the rest of the epoch should take (batches left x mean seconds
        between batches) is within twice this stream's start-up time: from opening it until it has delivered
        its prefetched batches and one more. (A worker's first batch comes early; its second can take 4x as
        long: measured at L = 100,000 with a stored retrieval, 59 ms then 181 ms, and timing only the first
        opened the next epoch too late, a 140 ms stall at every boundary.)"""
        if self.consumed >= len(self):
            self.epoch, self.consumed = self.epoch + 1, 0
        per_epoch, lead = len(self), self.prefetch_factor * self.num_workers
        if per_epoch == 0:
            raise ValueError(f"batch_size: {self.batch_size} leaves no batch in an epoch of rank {self.rank} (split "
                             f"'{self.split}'); an endless stream would never yield")
        opened = time.perf_counter()
        current, upcoming = self._epoch(self.epoch, self.consumed), None
        startup: Optional[float] = None  # seconds from opening the stream to its (lead + 1)-th batch
        delivered = 0  # batches delivered since the stream was opened
        previous, interval = None, None  # when the last batch arrived; mean seconds between batches
        while True:
            if upcoming is None and self.num_workers > 0:
                left = per_epoch - self.consumed
                if left <= lead or (startup is not None and interval is not None and left * interval <= 2 * startup):
                    upcoming = self._epoch(self.epoch + 1, 0)
            try:
                batch = next(current)
            except StopIteration:
                self.epoch, self.consumed = self.epoch + 1, 0
                current, upcoming = upcoming if upcoming is not None else self._epoch(self.epoch, 0), None
                continue
            now = time.perf_counter()
            delivered += 1
            if startup is None and delivered > lead:
                startup = now - opened
            if previous is not None:
                gap = now - previous
                interval = gap if interval is None else 0.9 * interval + 0.1 * gap
            previous = now
            self.consumed += 1
            yield batch

    def _epoch(self, epoch: int, consumed: int) -> Iterator:
        """The batches of ``epoch`` after the first ``consumed``; with workers they start loading now."""
        spec = _StreamSpec(self.paths, self.shard_starts, self.store, self.plan(epoch), epoch, self.rank, self.seed,
                           self.shuffle, self.buffer_rows, consumed, self.transform, self.group_users)
        kwargs = {}
        if self.num_workers > 0:
            kwargs = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False,
                      "worker_init_fn": _exit_with_parent}
        loader = DataLoader(_RankStream(spec), batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            **kwargs)
        if self.num_workers == 0:
            return iter(loader)
        # The workers fork here. With the trainer's objects frozen, a worker's garbage collector never walks them:
        # each walk writes every object's header, a copy-on-write fault per page of the trainer's heap in the
        # worker's first steps. The trainer unfreezes at once, so its own garbage is still collected.
        gc.freeze()
        try:
            return iter(loader)
        finally:
            gc.unfreeze()

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> Dict[str, int]:
        """Position for checkpointing. Order also depends on seed/world_size/batch_size/num_workers/shuffle,
        stored to check that a resume uses the same ones."""
        return {"epoch": self.epoch, "batches_consumed": self.consumed, "seed": self.seed, "world_size": self.world_size,
                "rank": self.rank, "batch_size": self.batch_size, "num_workers": self.num_workers,
                "shuffle": int(self.shuffle), "drop_last": int(self.drop_last)}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        for key in ("seed", "world_size", "batch_size", "num_workers", "shuffle", "drop_last"):
            if key in state and int(state[key]) != int(getattr(self, key)):
                raise ValueError(f"state_dict: {key}={state[key]} but this loader has {key}={getattr(self, key)}; "
                                 "resume needs the same value")
        self.epoch, self.consumed = int(state["epoch"]), int(state["batches_consumed"])


def make_dataloader(dataset_dir: str, split: str, rank: int, world_size: int, batch_size: int,
                    transform: Optional[Callable] = None, num_workers: int = 0, shuffle: bool = True, seed: int = 0,
                    max_seq_len: Optional[int] = None, drop_last: bool = False, drop_remainder: bool = True,
                    group_users: bool = False) -> ShardedLoader:
    """Rank ``rank`` of ``world_size``'s loader over ``split`` (see the module docstring). Yields
    ``transform(SampleBatch)`` (run inside the DataLoader workers; must be picklable) or ``SampleBatch``.
    ``max_seq_len`` sizes the shuffle buffer (see ``ShardedLoader``); the history window is the transform's. With
    ``shuffle`` and ``group_users``, each shuffle buffer keeps every user's rows together (``user_grouped_order``)."""
    return ShardedLoader(dataset_dir, split, rank, world_size, batch_size, transform=transform,
                         num_workers=num_workers, shuffle=shuffle, seed=seed, max_seq_len=max_seq_len,
                         drop_last=drop_last, drop_remainder=drop_remainder, group_users=group_users)
