"""Single-file outputs that appear atomically: written to a hidden temp file next to the target and
renamed over it only when complete, so a failed or killed writer never leaves a half-written file.

The rename is ``os.replace`` (iopath's ``mv`` refuses an existing target), so the target must be a
local path or a ``file://`` URI. Whole-directory outputs have their own writers:
``datapipes.tempdir.atomic_output_dir`` (prepare, synth) and ``training.checkpoint`` (every rank
writes into one temp directory, rank 0 renames it after a barrier).
"""

import contextlib
import os
import uuid
from typing import Iterator

from common.errors import UserError
from common.io import path_manager


def local_target(path: str, flag: str) -> str:
    """Absolute local path of ``path`` (a plain path or ``file://`` URI); UserError naming ``flag`` otherwise."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    if "://" in path:
        raise UserError(f"{flag} {path}: must be a local path (the file is written under a temp name and renamed)")
    return os.path.abspath(path)


def check_output_path(path: str, flag: str) -> None:
    """Before any work: UserError naming ``flag`` unless ``path`` is local and its folder exists."""
    if not os.path.isdir(os.path.dirname(local_target(path, flag))):
        raise UserError(f"{flag} {path}: its folder does not exist")


@contextlib.contextmanager
def atomic_file(path: str, flag: str = "--out", make_parent: bool = False) -> Iterator[str]:
    """Yield a temp file path next to ``path``; on success it is renamed to ``path``, on any exception
    it is removed.

    The parent directory is created when ``make_parent``, else it must exist (UserError naming ``flag``).
    """
    local = local_target(path, flag)
    parent, name = os.path.split(local)
    if make_parent:
        try:
            path_manager.mkdirs(parent)
        except OSError as err:
            raise UserError(f"{flag} {path}: cannot create directory {parent} ({err.strerror})") from None
    elif not path_manager.isdir(parent):
        raise UserError(f"{flag} {path}: directory {parent} does not exist")
    if path_manager.isdir(local):
        raise UserError(f"{flag} {path}: is a directory")
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, local)
    except BaseException:
        if path_manager.exists(tmp):
            path_manager.rm(tmp)
        raise


def write_text_atomic(path: str, text: str, flag: str = "--out", make_parent: bool = False) -> None:
    """Write ``text`` to ``path`` atomically (see ``atomic_file``)."""
    with atomic_file(path, flag, make_parent) as tmp:
        with path_manager.open(tmp, "w") as f:
            f.write(text)
