"""``RankProcesses``: helper processes that score parts of one worker's ranks (``muse serve --rank-processes P``).

A candidate's score does not depend on the other candidates, so a worker splits a rank of many candidates into up
to P parts: it sends P - 1 of them to helper processes of its own, scores the first itself, and joins the scores.
Processes, not threads: a part runs as ~600 small torch operations, and threads of one process hand the GIL over
at each of them. On the 2-core host of docs/serving.md two threads each scoring 500 of 1,000 candidates took 39 ms
where each half alone took 25; two processes scoring their halves side by side took 29 ms each, as fast as alone.

A helper is a ``spawn``ed process that loads the same package file (``serving.engine.load_engine``: checked byte
for byte; the multimodal table and the history store are memory-mapped, so it shares their pages with its worker;
it holds its own copy of the model's weights) and reports the package's id: one that loaded another id (the file
was replaced meanwhile) is not used. A part travels as one message of raw tensors (``encode``): the user, profile,
the part's candidates and side features, the history (vocabulary indices) and, for the multimodal GSU, the
history's content rows (``HistoryContent``: ~70 KB for 1,000 behaviors, ~4 MB for 100,000); the answer is the
part's float32 scores, or an error text.

A helper that dies, or takes more than ``PART_TIMEOUT`` seconds, is stopped and its part scored by the worker
(the rank answers, with the same scores); a new helper replaces it in the background, at most ``MAX_RESTARTS``
times within ``RESTART_WINDOW`` seconds. A part the helper answers with an error is scored by the worker too, so
a bad input fails as it would without helpers. A helper exits when its pipe closes: when the engine that owns it
is freed (after a reload, once the last request on the old package has ended) or when its worker dies.
"""

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
CONTENT_FIELDS = ("slots", "rows", "sq_norm", "ids")
_ALIGN = 64
_HEAD = struct.Struct("<Q")


@dataclass(frozen=True)
class HelperConfig:
    """What ``load_engine`` reads of a config, for a helper: no prefetch cache, no helpers of its own."""

    cache_bytes: int = 0
    cache_users: int = 1
    rank_processes: int = 1


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
    if content is not None:
        tensors.update({f"content.{field}": getattr(content, field) for field in CONTENT_FIELDS})
    return encode(tensors)


def score_part(predictor: Any, content_type: Any, tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 [C] scores of a decoded ``part_message`` through the package's ``rank_indices``."""
    content = None
    if "content.slots" in tensors:
        if content_type is None:
            raise ValueError("content: this package has no HistoryContent")
        content = content_type(**{field: tensors[f"content.{field}"] for field in CONTENT_FIELDS})
    side = {name: tensors.get(name) for name in ("candidate_cats", "candidate_cities", "candidate_provinces")}
    with torch.inference_mode():
        return predictor.rank_indices(tensors["user"], tensors["profile"], tensors["candidates"], tensors["items"],
                                      tensors["cats"], content=content, **side)


def helper_main(conn: Any, package: str) -> None:
    """One helper process: load ``package``, say ("ready", package id) or ("failed", why), then answer part
    messages (b"S" + float32 scores, or b"E" + error text) until the pipe closes."""
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
        try:
            scores = score_part(engine.predictor, engine.content_type, decode(data))
            reply = b"S" + scores.to(torch.float32).contiguous().numpy().tobytes()
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

    def send(self, message: bytes) -> bool:
        try:
            self.conn.send_bytes(message)
            return True
        except OSError:
            return self._fail("its pipe closed")

    def receive(self, count: int, timeout: float) -> Optional[torch.Tensor]:
        """The part's float32 [count] scores, or None (the helper answered an error, or failed: see ``state``)."""
        try:
            if not self.conn.poll(timeout):
                self._fail(f"no answer within {timeout:.0f} s")
                return None
            reply = self.conn.recv_bytes()
        except (EOFError, OSError):
            self._fail(f"exited with code {self.proc.exitcode}")
            return None
        if reply[:1] != b"S" or len(reply) != 1 + 4 * count:
            return None
        return torch.frombuffer(bytearray(reply[1:]), dtype=torch.float32) if count else torch.zeros(0)

    def _fail(self, reason: str) -> bool:
        self.state, self.reason = "failed", reason
        self.close()
        return False

    def close(self) -> None:
        """Close the pipe (the helper exits on EOF) and reap the process (killed if it does not exit)."""
        if self.state != "failed":
            self.state = "closed"
        self.conn.close()
        self.proc.join(2.0)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join(5.0)


class RankProcesses:
    """The helpers of one engine: ``count`` spawned at construction (they load the package while the worker does),
    ``await_ready`` once the worker knows its package id, then ``acquire`` / ``release`` around each rank."""

    def __init__(self, count: int, package: str, announce=None) -> None:
        self.package = package
        self.ctx = multiprocessing.get_context("spawn")
        self.announce = announce or (lambda text: print(text, file=sys.stderr, flush=True))
        self.helpers: List[Helper] = [Helper(self.ctx, package) for _ in range(count)]
        self.package_id: Optional[str] = None
        self._lock = threading.Lock()  # one rank at a time uses the helpers
        self._guard = threading.Lock()  # the list of helpers
        self._restarts: List[float] = []
        self._closed = False

    def await_ready(self, package_id: str, timeout: float = READY_TIMEOUT) -> None:
        self.package_id = package_id
        for i, helper in enumerate(self.helpers):
            if not helper.await_ready(package_id, timeout):
                self.announce(f"muse serve: rank process {i + 1} not used: {helper.reason}")

    def acquire(self) -> List[Helper]:
        """The ready helpers for one rank ([] while another rank holds them); ``release`` them after."""
        if not self._lock.acquire(blocking=False):
            return []
        with self._guard:
            return [h for h in self.helpers if h.state == "ready"]

    def release(self, used: List[Helper]) -> None:
        """End a rank: replace the helpers among ``used`` that failed during it."""
        failed = [h for h in used if h.state == "failed"]
        self._lock.release()
        for helper in failed:
            self.announce(f"muse serve: a rank process failed ({helper.reason}); its part was scored in the worker")
            self._replace(helper)

    def _replace(self, old: Helper) -> None:
        now = time.monotonic()
        with self._guard:
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW]
            if self._closed or len(self._restarts) >= MAX_RESTARTS:
                return
            self._restarts.append(now)
        threading.Thread(target=self._start_in_place, args=(old,), name="muse-rank-restart", daemon=True).start()

    def _start_in_place(self, old: Helper) -> None:
        helper = Helper(self.ctx, self.package)
        helper.await_ready(self.package_id or "", READY_TIMEOUT)
        with self._guard:
            if self._closed or old not in self.helpers:
                helper.close()
                return
            self.helpers[self.helpers.index(old)] = helper
        if helper.state != "ready":
            self.announce(f"muse serve: a replacement rank process is not used: {helper.reason}")

    def describe(self) -> Dict[str, int]:
        """{"helpers": configured, "ready": ready now} for /health."""
        with self._guard:
            return {"helpers": len(self.helpers), "ready": sum(h.state == "ready" for h in self.helpers)}

    def close(self) -> None:
        with self._guard:
            self._closed = True
            helpers = list(self.helpers)
        for helper in helpers:
            helper.close()
