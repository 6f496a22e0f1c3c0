"""The per-user history store: each split's behavior histories written once per user, read by user index.

Layout of ``<dataset>/<split>/histories/`` (``muse prepare`` writes it; every array is a plain ``.npy`` file that
every rank and data worker of a host memory-maps, so the pages are shared through the page cache)::

    store.json     format, users (U = the user vocabulary size), entries (E), max_len, vocab_fingerprint, split
    offsets.npy    int64 [U + 1, 2]: user index u -> [begin, end) of its entries in items/cats ((0, 0): no history)
    items.npy      [E] item index of each behavior, oldest first within a user (0 = out of vocabulary)
    cats.npy       [E] category index of each behavior, aligned with items.npy

Ids are int32, or int16 for an id space whose vocabulary fits (Taobao-MM's categories: 6 bytes a behavior
instead of 8); readers widen them to int64.
    profile.npy    int32 [U + 1, 5]: profile_1..profile_5 indices of each user (0 = unknown)

A user's entries are contiguous; users appear in the order of the raw user-features file. Every stored entry is
a real behavior: padding is removed, an out-of-vocabulary item keeps its position with item 0 and its (known)
category, as the released code does. A sample sees its user's first ``history_end`` entries (-1 = all of them),
so data sets with timestamps can give each sample the history before it without a copy per sample.
"""

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from common.errors import DataError
from datapipes.batch import PROFILE_FIELDS, RawBatch, SampleBatch

STORE_FORMAT = 1
STORE_DIR = "histories"
STORE_META = "store.json"
ID_DTYPES = (np.int16, np.int32)
_HEADER_BYTES = 128  # fixed .npy header of the growing arrays, rewritten with the final shape at close
# Rows whose windows hold at least this many entries on average are copied row by row (one contiguous slice each).
_ROW_COPY_MIN = 32


class _GrowingNpy:
    """A 1-D ``.npy`` file appended to in chunks; the header (fixed size) gets the final length at ``close``."""

    def __init__(self, path: str, dtype: np.dtype):
        self.path, self.dtype, self.count = path, np.dtype(dtype), 0
        self._file = open(path, "wb")
        self._file.write(_npy_header(self.dtype, (0,)))

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self._file.write(values.tobytes())
        self.count += int(values.size)

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(_npy_header(self.dtype, (self.count,)))
        self._file.close()


def _npy_header(dtype: np.dtype, shape: Tuple[int, ...]) -> bytes:
    """A version 1.0 ``.npy`` header of exactly ``_HEADER_BYTES`` bytes (space padded, newline terminated)."""
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    body_len = _HEADER_BYTES - 10
    text = text.ljust(body_len - 1) + "\n"
    if len(text) != body_len:
        raise ValueError(f"shape {shape}: too long for a {_HEADER_BYTES}-byte .npy header")
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + text.encode("latin1")


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest of ``ID_DTYPES`` holding indices 0..vocab_size."""
    return np.dtype(np.int16 if vocab_size < np.iinfo(np.int16).max else np.int32)


class HistoryWriter:
    """Writes one split's store under ``directory`` (local): ``add`` users' histories in any order, each user once.

    num_users: U, the user vocabulary size (offsets and profiles are indexed by user index 0..U).
    num_items, num_categories: vocabulary sizes (they choose the id dtypes, ``id_dtype``).
    fingerprint: the dataset's vocabulary fingerprint (``datapipes.vocab.fingerprint``), recorded for checks.
    """

    def __init__(self, directory: str, num_users: int, num_items: int, num_categories: int, fingerprint: str,
                 split: str):
        os.makedirs(directory, exist_ok=True)
        self.directory, self.num_users, self.fingerprint, self.split = directory, num_users, fingerprint, split
        self.offsets = np.zeros((num_users + 1, 2), np.int64)
        self.profile = np.zeros((num_users + 1, len(PROFILE_FIELDS)), np.int32)
        self.seen = np.zeros(num_users + 1, bool)
        self._items = _GrowingNpy(os.path.join(directory, "items.npy"), id_dtype(num_items))
        self._cats = _GrowingNpy(os.path.join(directory, "cats.npy"), id_dtype(num_categories))
        self.max_len = 0

    def add(self, users: np.ndarray, lengths: np.ndarray, items: np.ndarray, cats: np.ndarray,
            profile: np.ndarray) -> None:
        """users int64 [n] distinct user indices in 1..U not added before; lengths int64 [n]; items / cats int
        [sum(lengths)] their entries' indices, user after user, oldest first; profile int [n, 5]."""
        if users.size == 0:
            return
        if users.min() < 1 or users.max() > self.num_users or self.seen[users].any():
            raise ValueError("users: must be distinct user indices in [1, num_users] not added before")
        begin = self._items.count + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.offsets[users, 0] = begin
        self.offsets[users, 1] = begin + lengths
        self.profile[users] = profile
        self.seen[users] = True
        self._items.append(items)
        self._cats.append(cats)
        self.max_len = max(self.max_len, int(lengths.max()))

    def close(self) -> Dict[str, int]:
        """Finish every file; returns {"users_with_history", "entries", "max_len"}."""
        self._items.close()
        self._cats.close()
        np.save(os.path.join(self.directory, "offsets.npy"), self.offsets)
        np.save(os.path.join(self.directory, "profile.npy"), self.profile)
        meta = {"format": STORE_FORMAT, "split": self.split, "users": self.num_users, "entries": self._items.count,
                "max_len": self.max_len, "users_with_features": int(self.seen.sum()),
                "vocab_fingerprint": self.fingerprint}
        with open(os.path.join(self.directory, STORE_META), "w") as f:
            json.dump(meta, f, indent=1)
        return {"users_with_features": meta["users_with_features"], "entries": meta["entries"], "max_len": self.max_len}


def _identity(path: str) -> str:
    return path


class HistoryStore:
    """Read access to one split's store (see the module docstring); every array is memory-mapped read-only.

    Pickles by path (a DataLoader worker maps the files itself instead of receiving a copy).
    """

    def __init__(self, root: str, meta: dict, arrays: Dict[str, np.ndarray], local_path: Callable[[str], str]):
        self.root, self.meta, self._local_path = root, meta, local_path
        self.offsets, self.items, self.cats, self.profile = (arrays[k] for k in ("offsets", "items", "cats", "profile"))

    @classmethod
    def open(cls, root: str, fingerprint: Optional[str] = None, num_users: Optional[int] = None,
             local_path: Callable[[str], str] = _identity) -> "HistoryStore":
        """Map the store at ``root``; DataError naming the file when it is missing, truncated, of another format,
        or (when given) of another vocabulary ``fingerprint`` or user count ``num_users``. ``local_path`` turns
        a store path into a local file path (``common.io.path_manager.get_local_path`` for remote storage)."""
        meta_path = os.path.join(root, STORE_META)
        try:
            with open(local_path(meta_path)) as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise DataError(f"{meta_path}: (file): history store missing (run `muse prepare`)") from None
        except (OSError, ValueError) as err:
            raise DataError(f"{meta_path}: (file): not a readable history store description: {err}") from None
        if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
            raise DataError(f"{meta_path}: format: {meta.get('format') if isinstance(meta, dict) else meta!r} is not "
                            f"history store format {STORE_FORMAT}")
        if fingerprint is not None and meta.get("vocab_fingerprint") != fingerprint:
            raise DataError(f"{meta_path}: vocab_fingerprint: {meta.get('vocab_fingerprint')} differs from the "
                            f"dataset's {fingerprint} (a store of another vocabulary)")
        users, entries = int(meta.get("users", -1)), int(meta.get("entries", -1))
        if num_users is not None and users != num_users:
            raise DataError(f"{meta_path}: users: {users} differs from the dataset's {num_users} users")
        expected = {"offsets": (users + 1, 2), "items": (entries,), "cats": (entries,),
                    "profile": (users + 1, len(PROFILE_FIELDS))}
        dtypes = {"offsets": (np.int64,), "items": ID_DTYPES, "cats": ID_DTYPES, "profile": (np.int32,)}
        arrays = {}
        for name in expected:
            path = os.path.join(root, f"{name}.npy")
            try:
                arr = np.load(local_path(path), mmap_mode="r")
            except FileNotFoundError:
                raise DataError(f"{path}: (file): missing from the history store") from None
            except (OSError, ValueError) as err:
                raise DataError(f"{path}: (file): unreadable or truncated: {' '.join(str(err).split())}") from None
            if arr.dtype not in dtypes[name] or arr.shape != expected[name]:
                wanted = " or ".join(np.dtype(d).name for d in dtypes[name])
                raise DataError(f"{path}: (file): {arr.dtype} {arr.shape}, expected {wanted} {expected[name]}")
            arrays[name] = arr
        offsets = arrays["offsets"]
        if offsets.size and (offsets.min() < 0 or offsets.max() > entries or (offsets[:, 1] < offsets[:, 0]).any()):
            raise DataError(f"{os.path.join(root, 'offsets.npy')}: (file): offsets outside [0, {entries}] or reversed")
        return cls(root, meta, arrays, local_path)

    def __reduce__(self):
        return (_reopen, (self.root, self._local_path))

    @property
    def num_users(self) -> int:
        return int(self.meta["users"])

    @property
    def entries(self) -> int:
        return int(self.meta["entries"])

    def bounds(self, users: np.ndarray, ends: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """[begin, end) into items/cats of what each sample sees: users int [n] (indices), ends int [n] (entries
        visible, -1 = all; default all) -> int64 [n] begin, int64 [n] end."""
        users = np.asarray(users, dtype=np.int64)
        if users.size and (users.min() < 0 or users.max() > self.num_users):
            raise ValueError(f"users: indices outside [0, {self.num_users}]")
        begin, end = self.offsets[users, 0], self.offsets[users, 1]
        if ends is not None:
            ends = np.asarray(ends, dtype=np.int64)
            end = np.where(ends >= 0, np.minimum(end, begin + ends), end)
        return begin, end

    def history(self, user: int) -> Tuple[np.ndarray, np.ndarray]:
        """One user's whole history: [n] item indices, [n] category indices (int16 or int32), oldest first (views)."""
        begin, end = (int(v) for v in self.offsets[int(user)])
        return self.items[begin:end], self.cats[begin:end]

    def window(self, users: np.ndarray, length: int, ends: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """The last ``length`` visible entries of each sample's history, right-aligned (newest at column
        length-1), zeros on the left: int64 [n, length] items, int64 [n, length] categories."""
        begin, end = self.bounds(users, ends)
        return _right_aligned(self.items, begin, end, length), _right_aligned(self.cats, begin, end, length)


def _reopen(root: str, local_path: Callable[[str], str]) -> HistoryStore:
    return HistoryStore.open(root, local_path=local_path)


def _right_aligned(values: np.ndarray, begin: np.ndarray, end: np.ndarray, length: int) -> np.ndarray:
    """Rows ``values[max(begin, end - length):end]`` -> int64 [n, length], right-aligned, zeros on the left."""
    n = np.minimum(end - begin, length)
    out = np.zeros((begin.size, length), dtype=np.int64)
    total = int(n.sum())
    if total >= _ROW_COPY_MIN * begin.size:
        for i, (stop, count) in enumerate(zip(end.tolist(), n.tolist())):
            if count:
                out[i, length - count:] = values[stop - count:stop]
    elif total:
        row = np.repeat(np.arange(begin.size), n)
        k = np.arange(total) - np.repeat(np.cumsum(n) - n, n)
        out[row, length - n[row] + k] = values[end[row] - n[row] + k]
    return out


@dataclass(frozen=True)
class HistoryGather:
    """Picklable ``SampleBatch -> RawBatch`` transform: each sample's history window from the store.

    store: the split's ``HistoryStore``. max_seq_len: L, the longest window (None = whole histories). The window
    of a batch is as long as its longest visible history (at least 1, at most ``max_seq_len``); ``window_len``
    caps it further for consumers that read only the newest entries (DIN reads the recent ``recent_len``).
    Samples of one user with the same ``history_end`` are gathered once.
    """

    store: HistoryStore
    max_seq_len: Optional[int] = None
    window_len: Optional[int] = None

    def length_for(self, visible: np.ndarray) -> int:
        longest = int(visible.max()) if visible.size else 0
        for cap in (self.max_seq_len, self.window_len):
            if cap is not None:
                longest = min(longest, cap)
        return max(1, longest)

    def __call__(self, sample: SampleBatch) -> RawBatch:
        users, ends = sample.user_id.numpy(), sample.history_end.numpy()
        unique, inverse = np.unique(np.stack([users, ends], axis=1), axis=0, return_inverse=True)
        repeated = unique.shape[0] < users.size
        if repeated:  # gather each (user, end) once, then copy it to its samples
            users, ends = unique[:, 0], unique[:, 1]
        begin, end = self.store.bounds(users, ends)
        length = self.length_for(end - begin)
        items, cats = self.store.window(users, length, ends)
        if repeated:
            inverse = inverse.reshape(-1)
            items, cats = items[inverse], cats[inverse]
        return RawBatch(labels=sample.labels, user_id=sample.user_id, profile=sample.profile,
                        target_item=sample.target_item, target_cat=sample.target_cat, item_city=sample.item_city,
                        item_province=sample.item_province, history_items=torch.from_numpy(items),
                        history_cats=torch.from_numpy(cats))


@dataclass(frozen=True)
class Chain:
    """Picklable composition ``second(first(x))`` of two transforms (e.g. ``HistoryGather`` then ``GsuStage``)."""

    first: Callable
    second: Callable

    def __call__(self, x):
        return self.second(self.first(x))
