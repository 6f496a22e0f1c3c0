"""A native (C) kernel for the GSU's filter: gather int8 table rows by id and take their exact dot products with
a few int8 targets in one pass, without materialising the gathered rows anywhere.

Why: the filter is bound by random row reads (each 128 B row is two cache lines, a miss to DRAM for a table
larger than the caches). ``torch.index_select`` copies the rows one after another, so the core waits on each
miss in turn, and the product (``torch.mm`` on the rows converted to float32, or ``torch._int_mm``) then reads
them again. The loop below prefetches the rows ``_PREFETCH`` ids ahead, so a dozen misses are in flight at
once, and takes each row's dots while the next rows are on their way. On an AVX2 host this gathers *and* dots
faster than ``index_select`` alone gathers (``muse bench gsu``).

Exactness: an int8 entry has |v| <= 128, an int16 product |p| <= 2**14, and ``_mm256_madd_epi16`` sums two
products into int32 (<= 2**15); the row's dot accumulates in int32 (|dot| <= D * 2**14 < 2**31 for D < 2**17):
every step is exact integer arithmetic, so the dots are bit-identical to the other filter kernels'. The
portable branch (no AVX2, or D not a multiple of 16) does the same sums in plain int32 C.

Build: the C source below is compiled once per host, lazily, with the system C compiler (``CC``, split as a shell
would, e.g. ``ccache gcc``; else ``cc``/``gcc`` on PATH), ``-O3`` and ``-mavx2`` only when the CPU reports AVX2,
into a cache directory (``MUSE_KERNEL_CACHE`` when set, used or refused with the reason, never replaced; else
``$XDG_CACHE_HOME/muse-torchrec/kernels``, else ``~/.cache/...``, else the temp directory), written to a temporary name and renamed so concurrent processes never
load a partial file; the file name is a hash of the source, flags and compiler, so a changed source or compiler
builds anew. ``library()`` returns None with the reason when there is no compiler or the build fails; kernel
selection (``model.gsu.kernels``) then simply does not offer this kernel. It is loaded with ``ctypes`` (the call
releases the GIL).
"""

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from typing import Optional, Tuple

import torch

CACHE_ENV = "MUSE_KERNEL_CACHE"
_PREFETCH = 16
_BUILD_TIMEOUT_S = 120

SOURCE = r"""
#include <stdint.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define PREFETCH @PREFETCH@

#if defined(__AVX2__)
#define MUSE_MADD(x, t) _mm256_madd_epi16((x), _mm256_loadu_si256((const __m256i *)(t)))

/* The sum of acc's 8 int32 lanes. */
static inline __attribute__((always_inline)) int32_t sum1(__m256i acc) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  s = _mm_hadd_epi32(s, s);
  s = _mm_hadd_epi32(s, s);
  return _mm_cvtsi128_si32(s);
}

/* The sums of 8 accumulators as one vector, in order: hadd pairs within each 128-bit lane, then add the lanes. */
static inline __attribute__((always_inline)) __m256i sum8(const __m256i *a) {
  __m256i q0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
  __m256i q1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[4], a[5]), _mm256_hadd_epi32(a[6], a[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(q0, q1, 0x20), _mm256_permute2x128_si256(q0, q1, 0x31));
}

/* One row's dots, D = chunks * 16, with g targets (g = 1 or a multiple of 8), chunk by chunk. */
static inline __attribute__((always_inline)) void row_dots_avx2(const int8_t *r, int64_t chunks, const int16_t *cols, int64_t g, int32_t *o) {
  int64_t width = chunks * 16;
  if (g == 1) {
    __m256i acc = _mm256_setzero_si256();
    for (int64_t c = 0; c < chunks; c++)
      acc = _mm256_add_epi32(acc, MUSE_MADD(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(r + 16 * c))), cols + 16 * c));
    o[0] = sum1(acc);
    return;
  }
  for (int64_t j = 0; j < g; j += 8) {
    const int16_t *t = cols + j * width;
    __m256i a[8];
    for (int k = 0; k < 8; k++) a[k] = _mm256_setzero_si256();
    for (int64_t c = 0; c < chunks; c++) {
      __m256i x = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(r + 16 * c)));
      for (int k = 0; k < 8; k++) a[k] = _mm256_add_epi32(a[k], MUSE_MADD(x, t + k * width + 16 * c));
    }
    _mm256_storeu_si256((__m256i *)(o + j), sum8(a));
  }
}
#endif

/* out[i * stride + j] = sum_d table[ids[i] * width + d] * cols[j * width + d] for i < n, j < g.
   g is 1 or a multiple of 8 (zero columns pad it). Every id is checked first: returns the first i whose id is
   outside [0, rows) before any row is read, else -1. */
int64_t muse_gather_dots_i8(const int8_t *table, int64_t rows, int64_t width, const int64_t *ids, int64_t n,
                            const int16_t *cols, int64_t g, int32_t *out, int64_t stride) {
  for (int64_t i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= rows) return i;
  for (int64_t i = 0; i < n; i++) {
    if (i + PREFETCH < n) {
      const int8_t *p = table + ids[i + PREFETCH] * width;
      __builtin_prefetch(p);
      __builtin_prefetch(p + 64);
      for (int64_t off = 128; off < width; off += 64) __builtin_prefetch(p + off);
    }
    const int8_t *r = table + ids[i] * width;
    int32_t *o = out + i * stride;
#if defined(__AVX2__)
    if (width == 128 && g == 1) {  /* the released width, one target: the row's 8 chunks widened first, all
                                      loads issued together */
      __m256i x[8];
      for (int c = 0; c < 8; c++) x[c] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(r + 16 * c)));
      __m256i acc = MUSE_MADD(x[0], cols);
      for (int c = 1; c < 8; c++) acc = _mm256_add_epi32(acc, MUSE_MADD(x[c], cols + 16 * c));
      o[0] = sum1(acc);
      continue;
    }
    if (width == 128) {
      row_dots_avx2(r, 8, cols, g, o);  /* inlined with the constant: unrolled */
      continue;
    }
    if (width % 16 == 0) {
      row_dots_avx2(r, width / 16, cols, g, o);
      continue;
    }
#endif
    for (int64_t j = 0; j < g; j++) {
      const int16_t *t = cols + j * width;
      int32_t acc = 0;
      for (int64_t d = 0; d < width; d++) acc += (int32_t)r[d] * (int32_t)t[d];
      o[j] = acc;
    }
  }
  return -1;
}
"""

_LOCK = threading.Lock()
_STATE: dict = {}  # "lib": the loaded function or None, "reason": why None


def gather_dots(table: torch.Tensor, ids: torch.Tensor, columns: torch.Tensor, out: torch.Tensor) -> int:
    """out [R, G'] int32 = rows ``ids`` [R] (int64) of ``table`` [N, D] (int8) x ``columns`` [G', D] (int16,
    G' = 1 or a multiple of 8). All contiguous. Returns -1, or the first index of ``ids`` outside [0, N).
    RuntimeError if the library is not available (``library()`` says why)."""
    function = library()
    if function is None:
        raise RuntimeError(f"native GSU kernel unavailable: {_STATE.get('reason')}")
    n, width = table.shape
    return int(function(table.data_ptr(), n, width, ids.data_ptr(), ids.shape[0], columns.data_ptr(),
                        columns.shape[0], out.data_ptr(), out.stride(0)))


def library():
    """The compiled ``muse_gather_dots_i8`` (a ctypes function), built and loaded once per process; None when it
    cannot be built here (``unavailable_reason()`` says why)."""
    if "lib" in _STATE:
        return _STATE["lib"]
    with _LOCK:
        if "lib" not in _STATE:
            _STATE["lib"], _STATE["reason"] = _load()
    return _STATE["lib"]


def unavailable_reason() -> str:
    """Why ``library()`` is None ("" when it loaded)."""
    library()
    return _STATE.get("reason", "")


def _load() -> Tuple[Optional[object], str]:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return None, "no C compiler (set CC, or put cc/gcc on PATH)"
    flags = ["-O3", "-shared", "-fPIC", "-std=c99"] + (["-mavx2"] if _has_avx2() else [])
    source = SOURCE.replace("@PREFETCH@", str(_PREFETCH))
    try:
        version = subprocess.run([*shlex.split(compiler), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, ValueError, subprocess.SubprocessError) as err:  # ValueError: CC that shlex cannot split
        return None, f"{compiler} --version failed: {err}"
    digest = hashlib.sha256("\0".join([source, " ".join(flags), compiler, version]).encode()).hexdigest()[:20]
    directory, why = _cache_dir()
    if directory is None:
        return None, why
    path = os.path.join(directory, f"muse_gsu_{digest}.so")
    if not os.path.exists(path) or not _intact(path):  # a truncated or foreign file: built anew (atomically)
        reason = _build(compiler, flags, source, directory, path)
        if reason:
            return None, reason
    try:
        function = ctypes.CDLL(path).muse_gather_dots_i8
    except (OSError, AttributeError) as err:  # AttributeError: a library without the symbol
        return None, f"loading {path} failed: {err} (delete it to rebuild)"
    function.restype = ctypes.c_int64
    function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                         ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    return function, ""


def _build(compiler: str, flags: list, source: str, directory: str, path: str) -> str:
    """Compile ``source`` into ``path`` (atomically: a temp file in the same directory, renamed); "" or why not."""
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
    return ""


def _intact(path: str) -> bool:
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


def _cache_dir() -> Tuple[Optional[str], str]:
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


def _has_avx2() -> bool:
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
