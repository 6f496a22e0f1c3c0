"""``RankProcesses``: helper processes that score parts of one worker's ranks (``muse serve --rank-processes P``).

A candidate's score does not depend on the other candidates, so a worker splits a rank of many candidates into up
to P parts: it sends P - 1 of them to helper processes of its own, scores the first itself, and joins the scores.
Processes, not threads: a part runs as ~500 small torch operations, and threads of one process hand the GIL over
at each of them. On the 2-core host of docs/serving.md two threads each scoring 500 of 1,000 candidates took 39 ms
where each half alone took 25; two processes scoring their halves side by side took 29 ms each, as fast as alone.

A helper is a ``spawn``ed process that loads the same package file (``serving.engine.load_engine``: checked byte
for byte; the multimodal table and the history store are memory-mapped, so it shares their pages with its worker;
it holds its own copy of the model's weights) and reports the package's id: one that loaded another id (the file
was replaced meanwhile) is not used. A part travels as one message of raw tensors (``encode``): the user, profile,
the part's candidates and side features, the history (vocabulary indices) and, for the multimodal GSU, the
history's content rows (``HistoryContent``: ~70 KB for 1,000 behaviors, ~4 MB for 100,000); the answer is the
part's float32 scores, or an error text.

A part is sent from a thread of its own, so a helper that stops reading cannot block the worker. A helper that dies,
or does not answer within ``PART_TIMEOUT`` seconds, is stopped and its part scored by the worker (the rank answers,
with the same scores); a new helper replaces it in the background, at most ``MAX_RESTARTS`` times within
``RESTART_WINDOW`` seconds (later ones wait for the window). A part the helper answers with an error is scored by
the worker too, so a bad input fails as it would without helpers; a part that cannot be encoded is scored there
as well. A helper exits when its pipe closes: when the engine that owns it
is freed (after a reload, once the last request on the old package has ended) or when its worker dies.
"""

import dataclasses
import multiprocessing
import os
import pickle
import signal
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

PART_TIMEOUT = 60.0
READY_TIMEOUT = 600.0
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
_ALIGN = 64
_HEAD = struct.Struct("<Q")
_ELAPSED = struct.Struct("<d")  # an answer's seconds in the helper (decode and score), before its scores


@dataclass(frozen=True)
class HelperConfig:
    """What ``load_engine`` reads of a config, for a helper: no prefetch cache, no helpers of its own."""

    cache_bytes: int = 0
    cache_users: int = 1
    rank_parts: int = 1


def encode(tensors: Dict[str, Optional[torch.Tensor]]) -> bytes:
    """One message of named tensors (None values left out): a pickled header (name, dtype, shape, offset) then the
    raw bytes of each tensor, each at a 64-byte aligned offset."""
    header, blobs, offset = [], [], 0
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        tensor = tensor.detach().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
        header.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset, len(raw)))
        pad = -len(raw) % _ALIGN
        blobs += [raw, bytes(pad)]
        offset += len(raw) + pad
    head = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
    lead = _HEAD.size + len(head)
    return b"".join([_HEAD.pack(len(head)), head, bytes(-lead % _ALIGN)] + blobs)


def decode(data: bytes) -> Dict[str, torch.Tensor]:
    """The tensors of an ``encode`` message (writable, in one buffer copied from ``data``)."""
    buffer = bytearray(data)
    (size,) = _HEAD.unpack_from(buffer)
    header = pickle.loads(bytes(buffer[_HEAD.size:_HEAD.size + size]))
    base = _HEAD.size + size
    base += -base % _ALIGN
    out = {}
    for name, dtype, shape, offset, nbytes in header:
        kind = getattr(torch, dtype)
        if nbytes:
            flat = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=base + offset).view(kind)
        else:
            flat = torch.empty(0, dtype=kind)
        out[name] = flat.view(shape)
    return out


def part_message(user: torch.Tensor, profile: torch.Tensor, candidates: torch.Tensor, items: torch.Tensor,
                 cats: torch.Tensor, side: Dict[str, Optional[torch.Tensor]], content: Any) -> bytes:
    """The message of one part: ``Predictor.rank_indices``' arguments (side: its candidate_* keywords; content: a
    ``HistoryContent`` or None)."""
    tensors = {"user": user, "profile": profile, "candidates": candidates, "items": items, "cats": cats, **side}
    if content is not None:  # its own fields: a package's HistoryContent may predate some (``ids``)
        tensors.update({f"content.{f.name}": getattr(content, f.name) for f in dataclasses.fields(content)})
    return encode(tensors)


def score_part(predictor: Any, content_type: Any, tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 [C] scores of a decoded ``part_message`` through the package's ``rank_indices``."""
    content = None
    if "content.slots" in tensors:
        if content_type is None:
            raise ValueError("content: this package has no HistoryContent")
        content = content_type(**{name[len("content."):]: value for name, value in tensors.items()
                                  if name.startswith("content.")})
    side = {name: tensors.get(name) for name in ("candidate_cats", "candidate_cities", "candidate_provinces")}
    with torch.inference_mode():
        return predictor.rank_indices(tensors["user"], tensors["profile"], tensors["candidates"], tensors["items"],
                                      tensors["cats"], content=content, **side)


def helper_main(conn: Any, package: str) -> None:
    """One helper process: load ``package``, say ("ready", package id) or ("failed", why), then answer part
    messages (b"S" + its seconds as a float64 + float32 scores, or b"E" + error text) until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the worker decides
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from common import quiet

    quiet.configure(os.environ.get("MUSE_VERBOSE") == "1")
    torch.set_num_threads(1)
    from serving.engine import load_engine

    try:
        engine = load_engine(package, None, HelperConfig(), generation=0)
    except Exception as err:  # noqa: BLE001 - said to the worker, which serves without this helper
        _send(conn, ("failed", f"{type(err).__name__}: {err}"))
        return
    if not _send(conn, ("ready", engine.info.package_id)):
        return
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        start = time.perf_counter()
        try:
            scores = score_part(engine.predictor, engine.content_type, decode(data))
            reply = (b"S" + _ELAPSED.pack(time.perf_counter() - start)
                     + scores.to(torch.float32).contiguous().numpy().tobytes())
        except Exception as err:  # noqa: BLE001 - the worker scores this part itself
            reply = b"E" + f"{type(err).__name__}: {err}".encode("utf-8", "replace")
        try:
            conn.send_bytes(reply)
        except OSError:
            return


def _send(conn: Any, message: Tuple[str, str]) -> bool:
    try:
        conn.send(message)
        return True
    except OSError:
        return False


class Helper:
    """One helper process and the worker's end of its pipe. state: loading, ready, failed or closed."""

    def __init__(self, ctx: Any, package: str) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=helper_main, args=(child, package), name="muse-rank-helper", daemon=True)
        self.proc.start()
        child.close()  # the worker keeps only its end: the helper sees EOF when the worker goes
        self.state, self.reason = "loading", None
        self.errors = 0  # parts it answered with an error
        self.elapsed = 0.0  # seconds its last answer took in the helper
        self._sender: Optional[threading.Thread] = None

    def await_ready(self, package_id: str, timeout: float) -> bool:
        """Wait for the helper's first word; ready only when it loaded ``package_id``."""
        try:
            if not self.conn.poll(timeout):
                return self._fail(f"not ready after {timeout:.0f} s")
            kind, detail = self.conn.recv()
        except (EOFError, OSError):
            return self._fail(f"exited with code {self.proc.exitcode} while loading")
        if kind != "ready":
            return self._fail(detail)
        if detail != package_id:
            return self._fail("loaded another package (the file was replaced while it loaded)")
        self.state = "ready"
        return True

    def usable(self) -> bool:
        """Ready and its process running; a helper whose process has ended (killed while idle) fails here, before a
        part is sent to it."""
        if self.state == "ready" and self.proc.exitcode is not None:
            self._fail(f"exited with code {self.proc.exitcode}")
        return self.state == "ready"

    def send(self, message: bytes) -> None:
        """Start sending a part, in a thread of its own: a helper that stops reading (stopped, hung) cannot block the
        worker, whose wait for the answer (``receive``) has a deadline; the worker scores its own part meanwhile."""
        def write() -> None:
            try:
                self.conn.send_bytes(message)
            except (OSError, ValueError):  # closed meanwhile: ``receive`` sees the end of the pipe
                pass

        self._sender = threading.Thread(target=write, name="muse-rank-send", daemon=True)
        self._sender.start()

    def receive(self, count: int, timeout: float) -> Optional[torch.Tensor]:
        """The part's float32 [count] scores, or None (the helper answered an error, or failed: see ``state``)."""
        try:
            if not self.conn.poll(timeout):
                self._fail(f"no answer within {timeout:.0f} s")
                return None
            reply = self.conn.recv_bytes()
        except (EOFError, OSError):
            self._fail(f"exited with code {self.proc.exitcode}" if self.proc.exitcode is not None else "its pipe closed")
            return None
        if self._sender is not None:  # an answer means the helper read the whole part: the sender is done
            self._sender.join()
            self._sender = None
        if reply[:1] == b"E":
            self.errors += 1
            self.reason = reply[1:].decode("utf-8", "replace")
            return None
        head = 1 + _ELAPSED.size
        if reply[:1] != b"S" or len(reply) != head + 4 * count:
            self._fail(f"answered {len(reply)} bytes for {count} scores")
            return None
        (self.elapsed,) = _ELAPSED.unpack_from(reply, 1)
        return torch.frombuffer(bytearray(reply[head:]), dtype=torch.float32) if count else torch.zeros(0)

    def _fail(self, reason: str) -> bool:
        """A helper that failed is killed at once (a hung one too; a send blocked on it then ends)."""
        self.state, self.reason = "failed", reason
        self.close(kill=True)
        return False

    def close(self, kill: bool = False) -> None:
        """Close the pipe (the helper exits on EOF) and reap the process in the background (killed if it has not
        exited within 5 s, or at once with ``kill``): closing never waits for the helper."""
        if self.state != "failed":
            self.state = "closed"
        if kill and self.proc.exitcode is None:
            self.proc.kill()
        self.conn.close()
        threading.Thread(target=_reap, args=(self.proc,), name="muse-rank-reap", daemon=True).start()


def _reap(proc: Any) -> None:
    proc.join(5.0)
    if proc.exitcode is None:
        proc.kill()
        proc.join(5.0)


class RankProcesses:
    """The helpers of one engine: ``count`` spawned at construction (they load the package while the worker does),
    ``await_ready`` once the worker knows its package id, then ``acquire`` / ``release`` around each rank. A failed
    helper is replaced in the background, at most ``MAX_RESTARTS`` times within ``RESTART_WINDOW`` seconds; beyond
    that it is retried at a later rank, once the window allows."""

    def __init__(self, count: int, package: str, announce=None) -> None:
        self.package = package
        self.ctx = multiprocessing.get_context("spawn")
        self.announce = announce or (lambda text: print(text, file=sys.stderr, flush=True))
        self.helpers: List[Helper] = [Helper(self.ctx, package) for _ in range(count)]
        self.package_id: Optional[str] = None
        self._lock = threading.Lock()  # one rank at a time uses the helpers
        self._guard = threading.Lock()  # the list of helpers, the replacements
        self._restarts: List[float] = []
        self._replacing: set = set()  # ids of the failed helpers a replacement is starting for
        self._said_limit = False
        self._closed = False

    def await_ready(self, package_id: str, timeout: float = READY_TIMEOUT) -> None:
        self.package_id = package_id
        for i, helper in enumerate(self.helpers):
            if not helper.await_ready(package_id, timeout):
                self.announce(f"muse serve: rank process {i + 1} not used: {helper.reason}")

    def acquire(self) -> Optional[List[Helper]]:
        """The ready helpers for one rank (perhaps none), or None while another rank holds them; after a list (even
        an empty one), ``release`` it."""
        if not self._lock.acquire(blocking=False):
            return None
        with self._guard:
            helpers = list(self.helpers)
        ready = [h for h in helpers if h.usable()]  # a helper found dead here fails now
        for helper in helpers:
            if helper.state == "failed":  # found dead, or one whose replacement the restart limit held back
                self._replace(helper)
        return ready

    def release(self, used: List[Helper]) -> None:
        """End a rank (``used``: what ``acquire`` gave): replace the helpers that failed during it, say which answered
        an error."""
        self._lock.release()
        for helper in used:
            if helper.state == "failed":
                self.announce(f"muse serve: a rank process failed ({helper.reason}); its part was scored in the worker")
                self._replace(helper)
            elif helper.errors == 1:
                helper.errors += 1  # said once per helper
                self.announce(f"muse serve: a rank process answered an error, its part was scored in the worker "
                              f"(said once): {helper.reason}")

    def _replace(self, old: Helper) -> None:
        now = time.monotonic()
        with self._guard:
            if self._closed or id(old) in self._replacing or old not in self.helpers:
                return
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW]
            if len(self._restarts) >= MAX_RESTARTS:
                if not self._said_limit:
                    self._said_limit = True
                    self.announce(f"muse serve: {MAX_RESTARTS} rank processes replaced within {RESTART_WINDOW:.0f} s; "
                                  "the next replacement waits for that window (ranks are scored in the worker meanwhile)")
                return
            self._said_limit = False
            self._restarts.append(now)
            self._replacing.add(id(old))
        threading.Thread(target=self._start_in_place, args=(old,), name="muse-rank-restart", daemon=True).start()

    def _start_in_place(self, old: Helper) -> None:
        helper = Helper(self.ctx, self.package)
        helper.await_ready(self.package_id or "", READY_TIMEOUT)
        with self._guard:
            self._replacing.discard(id(old))
            if self._closed or old not in self.helpers:
                helper.close()
                return
            self.helpers[self.helpers.index(old)] = helper
        if helper.state != "ready":
            self.announce(f"muse serve: a replacement rank process is not used: {helper.reason}")

    def describe(self) -> Dict[str, int]:
        """{"helpers": configured, "ready": ready now} for /health."""
        with self._guard:
            helpers = list(self.helpers)
        return {"helpers": len(helpers), "ready": sum(h.usable() for h in helpers)}

    def close(self) -> None:
        with self._guard:
            self._closed = True
            helpers = list(self.helpers)
        for helper in helpers:
            helper.close()
