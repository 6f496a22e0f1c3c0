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

Build: the C source below is compiled once per host, lazily, by ``model.gsu.cbuild`` (the system C compiler,
``-O3``, ``-mavx2`` only when the CPU reports AVX2, cached as ``muse_gsu_<hash>.so`` in ``MUSE_KERNEL_CACHE`` or the
user's cache directory, written atomically). ``library()`` returns None with the reason when there is no compiler
or the build fails; kernel selection (``model.gsu.kernels``) then simply does not offer this kernel. It is loaded
with ``ctypes`` (the call releases the GIL).
"""

import ctypes

import torch

from model.gsu import cbuild
from model.gsu.cbuild import CACHE_ENV, intact as _intact  # noqa: F401 (the names tests and callers use)

_PREFETCH = 16

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

_SIGNATURES = {"muse_gather_dots_i8": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                                      ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                                      ctypes.c_int64])}
LIBRARY = cbuild.Library("muse_gsu", SOURCE.replace("@PREFETCH@", str(_PREFETCH)), _SIGNATURES)


def gather_dots(table: torch.Tensor, ids: torch.Tensor, columns: torch.Tensor, out: torch.Tensor) -> int:
    """out [R, G'] int32 = rows ``ids`` [R] (int64) of ``table`` [N, D] (int8) x ``columns`` [G', D] (int16,
    G' = 1 or a multiple of 8). All contiguous. Returns -1, or the first index of ``ids`` outside [0, N).
    RuntimeError if the library is not available (``library()`` says why)."""
    function = library()
    if function is None:
        raise RuntimeError(f"native GSU kernel unavailable: {unavailable_reason()}")
    n, width = table.shape
    return int(function(table.data_ptr(), n, width, ids.data_ptr(), ids.shape[0], columns.data_ptr(),
                        columns.shape[0], out.data_ptr(), out.stride(0)))


def library():
    """The compiled ``muse_gather_dots_i8`` (a ctypes function), built and loaded once per process (``LIBRARY``);
    None when it cannot be built here (``unavailable_reason()`` says why)."""
    return LIBRARY.function("muse_gather_dots_i8")


def unavailable_reason() -> str:
    """Why ``library()`` is None ("" when it loaded)."""
    return LIBRARY.reason()
