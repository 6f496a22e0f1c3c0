"""``PrefetchCache``: the bounded LRU of prefetched users of one worker (thread-safe).

Only ``POST /prefetch`` fills it (``prefetch``); a rank request takes a user from it (``lookup``) or, when the
user is not there, reads the store itself without caching. A prefetch of a user whose prefetch is still running
waits for it, and so does a rank request for that user, so a rank that follows a prefetch closely never reads
twice. Bounds: at most ``max_users`` entries and ``max_bytes`` bytes (entries' ``nbytes``); the least recently
used entries are evicted first; an entry larger than ``max_bytes`` alone is returned but not kept.
"""

import threading
from collections import OrderedDict
from typing import Callable, Dict, Generic, Optional, Protocol, Tuple, TypeVar


class Sized(Protocol):
    nbytes: int


V = TypeVar("V", bound=Sized)


class _Pending:
    """A load in progress: waiters block on ``done`` and then read ``value`` (None when the load raised)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value = None


class PrefetchCache(Generic[V]):
    """LRU of ``key -> entry``. on_change(entries, bytes, evicted) is called after every change (for metrics)."""

    def __init__(self, max_bytes: int, max_users: int,
                 on_change: Optional[Callable[[int, int, int], None]] = None) -> None:
        self.max_bytes, self.max_users = max_bytes, max_users
        self._entries: "OrderedDict[int, V]" = OrderedDict()
        self._pending: Dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self._on_change = on_change

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: int) -> bool:
        with self._lock:
            return key in self._entries

    def lookup(self, key: int) -> Optional[V]:
        """The cached entry of ``key`` (waiting for its prefetch if one is running), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            pending = self._pending.get(key)
        if pending is None:
            return None
        pending.done.wait()
        return pending.value

    def prefetch(self, key: int, load: Callable[[], V]) -> Tuple[V, bool]:
        """(entry of ``key``, whether it was already cached or being loaded); loads and keeps it otherwise.
        An exception of ``load`` propagates (nothing is kept)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry, True
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = self._pending[key] = _Pending()
        if not owner:
            pending.done.wait()
            if pending.value is not None:
                return pending.value, True
            return self.prefetch(key, load)  # the other load failed: try ourselves
        try:
            value = load()
            pending.value = value
            self._insert(key, value)
            return value, False
        finally:
            with self._lock:
                del self._pending[key]
            pending.done.set()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0
        self._changed(0)

    def _insert(self, key: int, value: V) -> None:
        evicted = 0
        with self._lock:
            if value.nbytes > self.max_bytes:
                return
            self._entries[key] = value
            self.bytes += value.nbytes
            while self.bytes > self.max_bytes or len(self._entries) > self.max_users:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.nbytes
                evicted += 1
        self._changed(evicted)

    def _changed(self, evicted: int) -> None:
        if self._on_change is not None:
            self._on_change(len(self._entries), self.bytes, evicted)
