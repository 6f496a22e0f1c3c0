"""``WorkerState``: what one worker process serves with: its ``Engine`` (swapped whole on reload) and metrics.

Reload: the supervisor's SIGHUP and ``POST /admin/reload`` both raise one shared generation counter; a watcher
thread in every worker sees it change, loads the package file again into a new ``Engine`` (checked byte for
byte, with an empty cache) while the old one keeps serving, then swaps the reference. A request takes the
engine once when it starts and keeps it to the end, so a request in flight finishes on the package it began
with; the old engine is freed when its last request ends. A package that fails to load is reported and the
worker keeps serving the one it has.
"""

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from common.errors import UserError
from serving.config import ServeConfig
from serving.engine import Engine, load_engine
from serving.metrics import Metrics

_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class ReloadResult:
    generation: int
    ok: bool
    error: Optional[str]


class WorkerState:
    """One worker's engine, metrics and reload bookkeeping. generation: the shared ``multiprocessing.Value``."""

    def __init__(self, config: ServeConfig, index: int, metrics: Metrics, generation: Any) -> None:
        self.config, self.index, self.metrics, self._shared_generation = config, index, metrics, generation
        self._done = threading.Condition()
        self.attempted = int(generation.value)
        self.last_error: Optional[str] = None
        self.engine: Engine = self._load(self.attempted)
        self.metrics.gauge("generation", self.attempted)
        self._stop = threading.Event()
        self._watcher: Optional[threading.Thread] = None

    def _load(self, generation: int) -> Engine:
        return load_engine(self.config.package, self.config.histories, self.config, generation,
                           on_cache_change=self._cache_changed)

    def _cache_changed(self, users: int, nbytes: int, evicted: int) -> None:
        self.metrics.gauge("cache_users", users)
        self.metrics.gauge("cache_bytes", nbytes)
        if evicted:
            self.metrics.count("cache_evictions", evicted)

    def start_watcher(self) -> None:
        self._watcher = threading.Thread(target=self._watch, name="muse-reload", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(_POLL_SECONDS):
            wanted = int(self._shared_generation.value)
            if wanted > self.attempted:
                self._reload(wanted)

    def _reload(self, generation: int) -> None:
        start = time.perf_counter()
        try:
            engine = self._load(generation)
        except Exception as err:  # noqa: BLE001 - any failure keeps the old package serving
            message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
            print(f"muse serve: worker {self.index}: reload to generation {generation} failed, still serving "
                  f"generation {self.engine.generation}: {message}", file=sys.stderr, flush=True)
            self.metrics.count("reloads_failed")
            with self._done:
                self.attempted, self.last_error = generation, message
                self._done.notify_all()
            return
        old, self.engine = self.engine, engine
        self.metrics.gauge("generation", generation)
        self.metrics.gauge("cache_users", 0)
        self.metrics.gauge("cache_bytes", 0)
        self.metrics.count("reloads_ok")
        print(f"muse serve: worker {self.index}: generation {generation} loaded in {time.perf_counter() - start:.1f} s "
              f"(package {engine.info.package_id[:12]}, was {old.info.package_id[:12]})", file=sys.stderr, flush=True)
        with self._done:
            self.attempted, self.last_error = generation, None
            self._done.notify_all()

    def request_reload(self, timeout: float) -> ReloadResult:
        """Raise the shared generation (every worker reloads) and wait until this worker has tried it."""
        with self._shared_generation.get_lock():
            self._shared_generation.value += 1
            wanted = int(self._shared_generation.value)
        with self._done:
            self._done.wait_for(lambda: self.attempted >= wanted, timeout=timeout)
            if self.attempted < wanted:
                return ReloadResult(wanted, False, f"generation {wanted} still loading after {timeout:.0f} s")
            error = self.last_error if self.engine.generation < wanted else None
        return ReloadResult(wanted, error is None, error)
