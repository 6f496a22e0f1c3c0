"""The supervisor of ``muse serve``: one listening socket, W worker processes, signals.

The supervisor binds the socket (so a busy port is one clear error) and starts W workers with the ``spawn``
method; each receives the socket, loads the package into its own ``Engine`` (the multimodal table and the
history store are memory-mapped, so the workers share their pages through the page cache) and runs a uvicorn
server on the shared socket: the kernel hands each new connection to one worker, and a keep-alive connection
stays with it (the prefetch cache is per worker: send a prefetch and its rank on one connection).
The supervisor imports no torch; it waits until every worker has loaded the package (a worker that cannot
load it stops the start, with its message), prints the address, then watches:

- SIGTERM / SIGINT: close the socket (new connections are refused), send SIGTERM to the workers; uvicorn stops
  accepting, finishes the requests in flight (up to ``--shutdown-timeout`` seconds) and exits.
- SIGHUP: raise the shared package generation: every worker loads the package file again and swaps it in
  without failing requests in flight (``serving.state``); ``POST /admin/reload`` does the same.
- A worker that dies is restarted (it loads the current generation); more than ``MAX_RESTARTS`` deaths within
  ``RESTART_WINDOW`` seconds stop the server.
"""

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import socket
import sys
import time
from typing import Any, List, Optional

from common.errors import UserError
from serving.config import ServeConfig

START_TIMEOUT = 600.0
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one); ``UserError`` naming the flag otherwise."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UserError(f"--host {host}: cannot be resolved ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise UserError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def worker_main(config: ServeConfig, index: int, sock: socket.socket, shared_metrics: Any, generation: Any,
                events: Any) -> None:
    """One worker process: load the package, report ready (or why not), serve until SIGTERM (also sent when the
    supervisor dies, even by SIGKILL: no worker outlives it)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads come through the shared generation
    _terminate_with_parent()
    from common import quiet

    quiet.configure(os.environ.get("MUSE_VERBOSE") == "1")
    import torch
    import uvicorn

    from serving.app import build_app
    from serving.metrics import Metrics
    from serving.state import WorkerState

    torch.set_num_threads(1)  # a rank's parts run in processes of their own (ServeConfig.rank_processes)
    metrics = Metrics(shared_metrics, config.workers, index)
    try:
        state = WorkerState(config, index, metrics, generation)
    except UserError as err:
        events.put(("failed", index, str(err), True))
        sys.exit(2)
    except Exception as err:
        events.put(("failed", index, f"{type(err).__name__}: {err}", False))
        raise
    for name, status in state.engine.info.kernels.items():
        if status != "native" and index == 0:  # said once, by the first worker (all build the same way)
            print(f"muse serve: kernel {name}: {status}", file=sys.stderr, flush=True)
    state.start_watcher()
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_level="warning", access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=max(1, int(config.shutdown_timeout)),
                                           server_header=False))
    events.put(("ready", index, os.getpid(), None))
    server.run(sockets=[sock])
    state.stop()


def _terminate_with_parent() -> None:
    """Ask Linux for SIGTERM when the supervisor exits (prctl PR_SET_PDEATHSIG), and exit now if it already has;
    elsewhere (no prctl) workers end when the supervisor stops them."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        sys.exit(0)


class Supervisor:
    """Starts, watches and stops the workers of one server (see the module docstring)."""

    def __init__(self, config: ServeConfig, announce=print) -> None:
        self.config, self.announce = config, announce
        self.ctx = multiprocessing.get_context("spawn")
        self.sock: Optional[socket.socket] = None
        self.procs: List[Any] = []
        self.stopping = False
        self.deaths: List[float] = []

    def _start(self, index: int) -> Any:
        proc = self.ctx.Process(target=worker_main, name=f"muse-serve-{index}", daemon=False,
                                args=(self.config, index, self.sock, self.metrics, self.generation, self.events))
        proc.start()
        return proc

    def _on_stop(self, signum, frame) -> None:
        self.stopping = True

    def _on_hup(self, signum, frame) -> None:
        with self.generation.get_lock():
            self.generation.value += 1

    def _await_ready(self) -> None:
        ready, deadline = set(), time.monotonic() + START_TIMEOUT
        while len(ready) < len(self.procs):
            try:
                kind, index, detail, user = self.events.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode is not None]
                if self.stopping:
                    raise KeyboardInterrupt
                if dead and self.events.empty():
                    raise RuntimeError(f"worker {self.procs.index(dead[0])} exited with code {dead[0].exitcode} "
                                       "before it was ready")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"workers not ready after {START_TIMEOUT:.0f} s")
                continue
            if kind == "failed":
                raise UserError(detail) if user else RuntimeError(f"worker {index}: {detail}")
            ready.add(index)

    def run(self) -> int:
        """Serve until SIGTERM / SIGINT; 0 after a clean stop."""
        from serving.metrics import Metrics

        self.sock = bind_socket(self.config.host, self.config.port)
        host, port = self.sock.getsockname()[:2]
        self.metrics = Metrics.shared(self.config.workers)
        self.generation = self.ctx.Value("q", 1)
        self.events = self.ctx.Queue()
        previous = {s: signal.signal(s, self._on_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hup)
        try:
            self.procs = [self._start(i) for i in range(self.config.workers)]
            self._await_ready()
            self.announce(f"muse serve: listening on http://{host}:{port} ({self.config.workers} worker(s), "
                          f"{self.config.rank_parts} rank process(es) each, pid {os.getpid()})", flush=True)
            while not self.stopping:
                multiprocessing.connection.wait([p.sentinel for p in self.procs], timeout=0.5)
                if not self.stopping:
                    self._restart_dead()
            return 0
        finally:
            self._shutdown()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _restart_dead(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.exitcode is None:
                continue
            now = time.monotonic()
            self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW] + [now]
            if len(self.deaths) > MAX_RESTARTS:
                raise RuntimeError(f"workers died {len(self.deaths)} times within {RESTART_WINDOW:.0f} s; stopping")
            print(f"muse serve: worker {i} (pid {proc.pid}) exited with code {proc.exitcode}; restarting",
                  file=sys.stderr, flush=True)
            self.procs[i] = self._start(i)

    def _shutdown(self) -> None:
        """Refuse new connections, let every worker finish its requests in flight, then reap them."""
        if self.sock is not None:
            self.sock.close()
        for proc in self.procs:
            if proc.exitcode is None:
                proc.terminate()
        deadline = time.monotonic() + self.config.shutdown_timeout + 10
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                print(f"muse serve: worker pid {proc.pid} still running after shutdown; killing it", file=sys.stderr,
                      flush=True)
                proc.kill()
                proc.join()


def serve(config: ServeConfig) -> int:
    return Supervisor(config).run()
