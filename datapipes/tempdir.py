"""Whole-directory outputs that appear atomically: written under a hidden temp directory next to the
target and renamed into place only when complete, so a failed or killed run leaves no partial output."""

import contextlib
import os
import shutil
import uuid
from typing import Iterator

from common.errors import UserError

_TMP_MARK = ".tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(parent: str, name: str) -> None:
    """Delete temp directories of earlier runs for the same target whose process is gone (killed runs)."""
    prefix = f".{name}{_TMP_MARK}"
    for entry in os.listdir(parent):
        if entry.startswith(prefix):
            pid = entry[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out: str, force: bool = False, flag: str = "--out") -> Iterator[str]:
    """Yield a fresh temp directory; on success it replaces ``out``, on any exception it is deleted.

    ``out`` must not exist unless ``force``; its parent directory is created if needed.
    """
    if out.startswith("file://"):
        out = out[len("file://"):]
    if "://" in out:
        raise UserError(f"{flag} {out}: must be a local directory (the output is renamed into place atomically)")
    out = os.path.abspath(out)
    if os.path.lexists(out) and not os.path.isdir(out):
        raise UserError(f"{flag} {out}: is a file (choose a directory path)")
    if os.path.exists(out) and not force:
        raise UserError(f"{flag} {out}: already exists (choose a new directory or pass --force)")
    parent, name = os.path.split(out)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag} {out}: cannot create parent directory: {err.strerror}") from None
    _remove_stale(parent, name)
    tmp = os.path.join(parent, f".{name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
