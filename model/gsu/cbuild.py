"""Build and load the project's small C libraries (``model.gsu.native``, ``model.gsu.pq_native``,
``model.gsu.dense_select``, ``model.dice_native``, ``model.din_native``, each a ``Library``): compiled once per
host, lazily, with the system C compiler, cached on disk, loaded with ``ctypes``.

The compiler is ``CC`` (split as a shell would, e.g. ``ccache gcc``; else ``cc``/``gcc`` on PATH), run with
``-O3 -shared -fPIC -std=c99`` and ``-mavx2`` only when the CPU reports AVX2. The library goes into a cache
directory (``MUSE_KERNEL_CACHE`` when set, used or refused with the reason, never replaced; else
``$XDG_CACHE_HOME/muse-torchrec/kernels``, else ``~/.cache/...``, else the temp directory), written to a temporary
name and renamed so concurrent processes never load a partial file; its name is ``<prefix>_<hash>.so``, the hash
of the source, flags and compiler, so a changed source or compiler builds anew. A cached file that is not a whole
ELF file is built anew before it is loaded (``dlopen`` of a truncated one can crash the process).
``load_library`` returns the requested functions, or None with the reason (no compiler, a failed build, a
library without a symbol); callers then do not offer their kernel. A ctypes call releases the GIL.
"""

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from typing import Dict, Optional, Sequence, Tuple

import torch

CACHE_ENV = "MUSE_KERNEL_CACHE"
_BUILD_TIMEOUT_S = 120

# A C function's (restype, argtypes), as ctypes takes them.
Signature = Tuple[object, Sequence[object]]


def load_library(prefix: str, source: str, signatures: Dict[str, Signature]) -> Tuple[Optional[Dict[str, object]], str]:
    """({symbol: ctypes function} for every name of ``signatures``, "") from ``source`` compiled (or found in the
    cache) as ``<prefix>_<hash>.so``; (None, why) when it cannot be built or lacks a symbol."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None, "no C compiler (set CC, or put cc/gcc on PATH)"
    flags = ["-O3", "-shared", "-fPIC", "-std=c99"] + (["-mavx2"] if has_avx2() else [])
    try:
        version = subprocess.run([*shlex.split(compiler), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, ValueError, subprocess.SubprocessError) as err:  # ValueError: CC that shlex cannot split
        return None, f"{compiler} --version failed: {err}"
    digest = hashlib.sha256("\0".join([source, " ".join(flags), compiler, version]).encode()).hexdigest()[:20]
    directory, why = cache_dir()
    if directory is None:
        return None, why
    path = os.path.join(directory, f"{prefix}_{digest}.so")
    if not os.path.exists(path) or not intact(path):  # a truncated or foreign file: built anew (atomically)
        reason = _build(compiler, flags, source, directory, path)
        if reason:
            return None, reason
    return _bind(path, signatures)


class Library:
    """A C library built and loaded on first use, once per process (thread-safe): ``load_library`` of ``prefix``,
    ``source`` and ``signatures``. ``function(symbol)`` is the ctypes function, or None where it cannot be built
    (``reason()`` says why). ``Library.absent(why)``: one that never loads (hosts without a compiler, in tests)."""

    def __init__(self, prefix: str, source: str, signatures: Dict[str, Signature]) -> None:
        self.prefix, self.source, self.signatures = prefix, source, signatures
        self._lock = threading.Lock()
        self._loaded: Optional[Tuple[Optional[Dict[str, object]], str]] = None

    @classmethod
    def absent(cls, why: str) -> "Library":
        library = cls("", "", {})
        library._loaded = (None, why)
        return library

    def _load(self) -> Tuple[Optional[Dict[str, object]], str]:
        if self._loaded is None:
            with self._lock:
                if self._loaded is None:
                    self._loaded = load_library(self.prefix, self.source, self.signatures)
        return self._loaded

    def fresh(self) -> "Library":
        """The same library not yet loaded: built or found again on first use (after a change of CC or cache)."""
        return Library(self.prefix, self.source, self.signatures)

    def functions(self) -> Optional[Dict[str, object]]:
        """{symbol: ctypes function} for every symbol of the signatures, or None (``reason()``)."""
        return self._load()[0]

    def function(self, symbol: str) -> Optional[object]:
        functions = self.functions()
        return functions[symbol] if functions else None

    def reason(self) -> str:
        """Why ``function`` is None ("" when the library loaded)."""
        return self._load()[1]


def _bind(path: str, signatures: Dict[str, Signature]) -> Tuple[Optional[Dict[str, object]], str]:
    """The functions of the library at ``path`` with their ctypes signatures, or (None, why)."""
    try:
        library = ctypes.CDLL(path)
        functions = {name: getattr(library, name) for name in signatures}
    except (OSError, AttributeError) as err:  # AttributeError: a library without the symbol
        return None, f"loading {path} failed: {err} (delete it to rebuild)"
    for name, (restype, argtypes) in signatures.items():
        functions[name].restype = restype
        functions[name].argtypes = list(argtypes)
    return functions, ""


def _build(compiler: str, flags: list, source: str, directory: str, path: str) -> str:
    """Compile ``source`` into ``path`` (atomically: a temp file in the same directory, renamed); "" or why not."""
    try:
        with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as work:
            c_file, so_file = os.path.join(work, "gsu.c"), os.path.join(work, "gsu.so")
            with open(c_file, "w") as f:
                f.write(source)
            try:
                done = subprocess.run([*shlex.split(compiler), *flags, "-o", so_file, c_file], capture_output=True, text=True,
                                      timeout=_BUILD_TIMEOUT_S)
            except (OSError, subprocess.SubprocessError) as err:
                return f"{compiler} failed to run: {err}"
            if done.returncode != 0:
                first = (done.stderr.strip().splitlines() or ["no message"])[0]
                return f"{compiler} {' '.join(flags)} failed: {first}"
            os.replace(so_file, path)
    except OSError as err:  # a cache directory that os.access calls writable but that refuses files
        return f"building in {directory} failed: {err}"
    return ""


def intact(path: str) -> bool:
    """Whether ``path`` is a whole ELF file: its program and section header tables end within the file (they
    come last, so a truncated copy fails this; ``dlopen`` of one can crash the process with SIGBUS)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] not in (1, 2):
        return False
    order = "little" if head[5] == 1 else "big"
    field = lambda at, n: int.from_bytes(head[at:at + n], order)
    if head[4] == 2:  # 64-bit
        if len(head) < 64:
            return False
        ph, sh, ph_size, ph_num, sh_size, sh_num = field(32, 8), field(40, 8), field(54, 2), field(56, 2), field(58, 2), field(60, 2)
    else:
        ph, sh, ph_size, ph_num, sh_size, sh_num = field(28, 4), field(32, 4), field(42, 2), field(44, 2), field(46, 2), field(48, 2)
    return ph + ph_size * ph_num <= size and sh + sh_size * sh_num <= size


def cache_dir() -> Tuple[Optional[str], str]:
    """(the cache directory, "") or (None, why). A MUSE_KERNEL_CACHE the user named is used or refused, never
    replaced silently by another directory; without it, the first usable of the user cache and the temp dir."""
    named = os.environ.get(CACHE_ENV)
    if named:
        return (named, "") if _usable(named) else (None, f"{CACHE_ENV}={named}: not a writable directory")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for directory in (os.path.join(base, "muse-torchrec", "kernels"),
                      os.path.join(tempfile.gettempdir(), f"muse-torchrec-kernels-{os.getuid()}")):
        if _usable(directory):
            return directory, ""
    return None, f"no writable cache directory (set {CACHE_ENV})"


def _usable(directory: str) -> bool:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return False
    return os.path.isdir(directory) and os.access(directory, os.W_OK)


def has_avx2() -> bool:
    """Whether this CPU runs AVX2 (the capability torch dispatches on, or the kernel's cpuinfo flags)."""
    try:
        if str(torch.backends.cpu.get_cpu_capability()) in ("AVX2", "AVX512"):
            return True
    except (AttributeError, RuntimeError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx2" in line for line in f)
    except OSError:
        return False
