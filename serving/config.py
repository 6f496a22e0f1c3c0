"""``ServeConfig``: everything ``muse serve`` is started with, checked once (flag errors are ``UserError``)."""

import os
from dataclasses import dataclass
from typing import Optional

from common.errors import UserError

MAX_RANK_PROCESSES = 64  # processes a worker scores one rank in (itself and its helpers)


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one server (every worker gets a copy).

    package: the ``muse export`` package file; a reload reads this path again (replace the file atomically, as
             ``muse export`` writes it).
    histories: history store directory (``DATA/<split>/histories``); None = ``<package>.histories`` when it exists.
    host, port: where the listening socket is bound (port 0: a free port, printed at start).
    workers: worker processes sharing the socket; rank_processes: processes per worker (None = cpus / workers, at
             most ``MAX_RANK_PROCESSES``; ``rank_parts`` resolves it): a rank's candidates are scored in up to this
             many parts at once, one in the worker and one in each of its rank_processes - 1 helper processes
             (``serving.rank_processes``), torch at one intra-op thread in each (docs/serving.md: faster than
             torch's own threads, or threads over parts, on the 2-core AVX2 host measured).
    max_candidates, max_history: longest lists one rank request may carry; max_body_bytes: largest request body.
    cache_mb: bytes of prefetched users each worker keeps (least recently used evicted first); cache_users: and count.
    shutdown_timeout: seconds in-flight requests get to finish after SIGTERM before they are cancelled.
    """

    package: str
    histories: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    rank_processes: Optional[int] = None
    max_candidates: int = 10_000
    max_history: int = 200_000
    max_body_bytes: int = 16 << 20
    cache_mb: float = 1024.0
    cache_users: int = 10_000
    shutdown_timeout: float = 30.0

    def __post_init__(self) -> None:
        positive = {"workers": self.workers, "max-candidates": self.max_candidates, "max-history": self.max_history,
                    "max-body-bytes": self.max_body_bytes, "cache-users": self.cache_users}
        for flag, value in positive.items():
            if value < 1:
                raise UserError(f"--{flag}: must be >= 1 (got {value})")
        if self.rank_processes is not None and not 1 <= self.rank_processes <= MAX_RANK_PROCESSES:
            raise UserError(f"--rank-processes: must lie in [1, {MAX_RANK_PROCESSES}] (got {self.rank_processes})")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port: must lie in [0, 65535] (got {self.port})")
        if self.cache_mb < 0:
            raise UserError(f"--cache-mb: must be >= 0 (got {self.cache_mb})")
        if self.shutdown_timeout <= 0:
            raise UserError(f"--shutdown-timeout: must be > 0 (got {self.shutdown_timeout})")
        if not os.path.isfile(self.package):
            raise UserError(f"--package {self.package}: no such file")
        if self.histories is not None and not os.path.isdir(self.histories):
            raise UserError(f"--histories {self.histories}: not a directory (a history store: DATA/<split>/histories)")

    @property
    def rank_parts(self) -> int:
        """Processes a worker scores one rank in: ``rank_processes``, or cpus / workers (at least 1)."""
        return self.rank_processes or max(1, min(MAX_RANK_PROCESSES, (os.cpu_count() or 1) // self.workers))

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_mb * (1 << 20))
