"""Prometheus metrics of all workers, kept in one shared float64 array (a row per worker) and written as text.

The supervisor allocates ``Metrics.shared(workers)`` before it starts the workers; worker ``i`` writes only
row ``i`` (under its own lock, from its threads), and ``render`` (any worker's ``GET /metrics``) sums the rows,
so a scrape reaching one worker reports the whole server. A restarted worker continues its row (counters stay
monotonic). Exposition: the Prometheus text format 0.0.4, written here (no client library needed).
"""

import bisect
import threading
from dataclasses import dataclass
from multiprocessing.sharedctypes import RawArray
from typing import Dict, List, Tuple

import numpy as np

ENDPOINTS = ("rank", "prefetch", "health", "metrics", "reload", "other")
STATUS_CLASSES = ("2xx", "4xx", "5xx")
ERROR_KINDS = ("malformed_json", "invalid_request", "too_large", "not_found", "method_not_allowed", "no_store",
               "reload_failed", "internal")
TIMED_ENDPOINTS = ("rank", "prefetch")
# Upper bounds (seconds) of the latency histogram's buckets; +Inf is implied.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COUNTERS = ("cache_hits", "cache_misses", "cache_evictions", "reloads_ok", "reloads_failed")
GAUGES = ("cache_bytes", "cache_users", "in_flight", "generation")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Layout:
    """Offsets of every value in one worker's row."""

    requests: Dict[Tuple[str, str], int]
    errors: Dict[str, int]
    buckets: Dict[str, int]  # first of len(BUCKETS) + 1 counts (the last: +Inf), then sum
    counters: Dict[str, int]
    gauges: Dict[str, int]
    size: int

    @classmethod
    def build(cls) -> "Layout":
        n = 0

        def take(count: int = 1) -> int:
            nonlocal n
            n += count
            return n - count

        requests = {(e, s): take() for e in ENDPOINTS for s in STATUS_CLASSES}
        errors = {k: take() for k in ERROR_KINDS}
        buckets = {e: take(len(BUCKETS) + 2) for e in TIMED_ENDPOINTS}
        counters = {k: take() for k in COUNTERS}
        gauges = {k: take() for k in GAUGES}
        return cls(requests, errors, buckets, counters, gauges, n)


LAYOUT = Layout.build()


class Metrics:
    """One worker's view of the shared metrics: ``values`` float64 [workers, LAYOUT.size]; ``worker`` its row."""

    def __init__(self, shared: RawArray, workers: int, worker: int) -> None:
        self.shared, self.workers, self.worker = shared, workers, worker
        self.values = np.frombuffer(shared, dtype=np.float64).reshape(workers, LAYOUT.size)
        self.row = self.values[worker]
        self._lock = threading.Lock()

    @staticmethod
    def shared(workers: int) -> RawArray:
        """The zeroed shared array for ``workers`` rows (allocate before starting the worker processes)."""
        return RawArray("d", workers * LAYOUT.size)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one answered request of ``endpoint`` with HTTP ``status``; time it if the endpoint is timed."""
        endpoint = endpoint if endpoint in ENDPOINTS else "other"
        klass = f"{min(max(status // 100, 2), 5)}xx"
        with self._lock:
            self.row[LAYOUT.requests[(endpoint, klass)]] += 1
            if endpoint in LAYOUT.buckets and status < 400:
                base = LAYOUT.buckets[endpoint]
                self.row[base + bisect.bisect_left(BUCKETS, seconds)] += 1
                self.row[base + len(BUCKETS) + 1] += seconds

    def error(self, kind: str) -> None:
        with self._lock:
            self.row[LAYOUT.errors[kind]] += 1

    def count(self, name: str, by: float = 1.0) -> None:
        with self._lock:
            self.row[LAYOUT.counters[name]] += by

    def gauge(self, name: str, value: float) -> None:
        self.row[LAYOUT.gauges[name]] = value

    def add_gauge(self, name: str, by: float) -> None:
        with self._lock:
            self.row[LAYOUT.gauges[name]] += by

    def total(self, offset: int) -> float:
        """The sum over all workers of one value (tests and the bench read counters this way)."""
        return float(self.values[:, offset].sum())

    def render(self) -> str:
        """The whole server's metrics in the Prometheus text format."""
        total = self.values.sum(axis=0)
        out: List[str] = []

        def family(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        family("muse_requests_total", "counter", "Requests answered, by endpoint and HTTP status class.")
        for (endpoint, klass), i in LAYOUT.requests.items():
            out.append(f'muse_requests_total{{endpoint="{endpoint}",status="{klass}"}} {_num(total[i])}')
        family("muse_errors_total", "counter", "Requests refused or failed, by kind.")
        for kind, i in LAYOUT.errors.items():
            out.append(f'muse_errors_total{{kind="{kind}"}} {_num(total[i])}')
        family("muse_request_duration_seconds", "histogram", "Latency of successful requests, receipt to response.")
        for endpoint, base in LAYOUT.buckets.items():
            running = 0.0
            for j, bound in enumerate(BUCKETS + (float("inf"),)):
                running += total[base + j]
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append(f'muse_request_duration_seconds_bucket{{endpoint="{endpoint}",le="{le}"}} {_num(running)}')
            out.append(f'muse_request_duration_seconds_sum{{endpoint="{endpoint}"}} {_num(total[base + len(BUCKETS) + 1])}')
            out.append(f'muse_request_duration_seconds_count{{endpoint="{endpoint}"}} {_num(running)}')
        helps = {"cache_hits": "Rank requests served from a prefetched user.",
                 "cache_misses": "Rank and prefetch requests that read a user from the history store.",
                 "cache_evictions": "Prefetched users evicted (least recently used) to stay within the cache bounds.",
                 "reloads_ok": "Package reloads that succeeded, over all workers.",
                 "reloads_failed": "Package reloads that failed (the worker kept its package)."}
        for name, i in LAYOUT.counters.items():
            family(f"muse_{name}_total", "counter", helps[name])
            out.append(f"muse_{name}_total {_num(total[i])}")
        family("muse_cache_bytes", "gauge", "Bytes of prefetched users held, all workers.")
        out.append(f"muse_cache_bytes {_num(total[LAYOUT.gauges['cache_bytes']])}")
        family("muse_cache_users", "gauge", "Prefetched users held, all workers.")
        out.append(f"muse_cache_users {_num(total[LAYOUT.gauges['cache_users']])}")
        family("muse_in_flight_requests", "gauge", "Requests being processed, all workers.")
        out.append(f"muse_in_flight_requests {_num(total[LAYOUT.gauges['in_flight']])}")
        family("muse_package_generation", "gauge", "Package generation each worker serves (1 = as started).")
        for w in range(self.workers):
            out.append(f'muse_package_generation{{worker="{w}"}} {_num(self.values[w, LAYOUT.gauges["generation"]])}')
        return "\n".join(out) + "\n"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
