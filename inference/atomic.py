"""Single-file outputs that appear atomically: written to a hidden temp file next to the target and
renamed over it only when complete, so a failed or killed writer never leaves a half-written file."""

import contextlib
import os
import uuid
from typing import Iterator

from common.errors import UserError
from common.io import path_manager


@contextlib.contextmanager
def atomic_file(path: str, flag: str = "--out") -> Iterator[str]:
    """Yield a temp file path; on success it is renamed to ``path``, on any exception it is removed.

    The parent directory must exist (``UserError`` naming ``flag`` otherwise).
    """
    local = os.path.abspath(path_manager.get_local_path(path) if "://" in path else path)
    parent, name = os.path.split(local)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: directory {parent} does not exist")
    if os.path.isdir(local):
        raise UserError(f"{flag} {path}: is a directory")
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, local)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
