"""A native (C) kernel for the selection step of the dense broadcast top-K (``model.gsu.topk._dense_topk``): from
the exact integer dots of C targets with the U distinct items of one history, each target's top-k rank keys.

The torch formulation of the same step runs a dozen whole-matrix ops over [C, U] (the prefilter's products, a
``topk`` for its bound, ``nonzero``, the survivors' cosines in float64, a padded ``topk`` and a sort), which at
serving's 1,000 candidates cost more than the product itself (``muse bench kernels`` times both). The loop below
does it row by row in one pass over the row, with the row in cache:

1. a = fl32(dot * inverse) for every stride-th item, and a value A at most their k-th largest (from a histogram
   of them: ``sample_bound``), lowered by a relative 2**-19 (the bound of ``_dense_topk``: any A no larger than
   the k-th largest a is safe, items below the bound cannot reach the top k; see its docstring for the proof);
2. every item with a >= bound gets its exact score fl32(dot / sqrt(|r|^2 |t|^2)) computed in float64, as
   ``model.gsu.cosine.cosines`` computes it, plus 0.0, and its rank key (``model.gsu.ranking.rank_keys``: the
   score's order-preserving bits high, the item's index low);
3. the k largest keys, sorted descending.

The keys are kept by the GSU's shared running top-k in C (``model.gsu.rank_keys_c``: a buffer of 2k cut
by a branchless quickselect, as the PQ scan keeps its K'); a histogram, not a selection, finds A (a selection over
every item was most of the kernel's time).

The keys are bit-identical to the torch path's (IEEE float64 division and square root are correctly rounded, the
float32 products are the same single operations, and ``-std=c99`` compiles without contracting a * b + c); the
bound may differ in its last bit from torch's, which changes only how many items are scored, not the result.
Built and loaded like the filter kernel (``model.gsu.cbuild``); ``select_keys`` is None where no C compiler is.
"""

import ctypes
from typing import Optional

import torch

from model.gsu import cbuild
from model.gsu.rank_keys_c import RUNNING_TOPK_C

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

@RUNNING_TOPK@

/* A lower bound of the k-th largest a = fl32(dot * inverse) over every stride-th item (at least k of them), lowered
   by a relative 2**-19: a 64-bin histogram of those a over [min, max], the highest bin b where at least k of them
   lie at or above, and A = the lower edge of bin b - 1 (one bin below: the float bin arithmetic can misplace a
   value near an edge, never by a whole bin), clamped to min. At least k sampled a are >= A, so A is at most their
   k-th largest, which is all the bound of _dense_topk needs; the few items of the bins near A are scored too. */
static float sample_bound(const float *row, const float *inverse, int64_t u, int64_t stride, int64_t k) {
  enum { BINS = 64 };
  int32_t counts[BINS] = {0};
  float lo = row[0] * inverse[0], hi = lo;
  int64_t j = stride;
#if defined(__AVX2__)
  if (stride == 1 && u >= 16) {  /* every item (a short history): 8 estimates a step, the same min and max */
    __m256 vlo = _mm256_mul_ps(_mm256_loadu_ps(row), _mm256_loadu_ps(inverse)), vhi = vlo;
    for (j = 8; j + 8 <= u; j += 8) {
      __m256 a = _mm256_mul_ps(_mm256_loadu_ps(row + j), _mm256_loadu_ps(inverse + j));
      vlo = _mm256_min_ps(vlo, a);
      vhi = _mm256_max_ps(vhi, a);
    }
    float l[8], h[8];
    _mm256_storeu_ps(l, vlo);
    _mm256_storeu_ps(h, vhi);
    for (int x = 0; x < 8; x++) {
      lo = l[x] < lo ? l[x] : lo;
      hi = h[x] > hi ? h[x] : hi;
    }
  }
#endif
  for (; j < u; j += stride) {
    float a = row[j] * inverse[j];
    lo = a < lo ? a : lo;
    hi = a > hi ? a : hi;
  }
  float a_bound = lo, magnitude = fabsf(lo) > fabsf(hi) ? fabsf(lo) : fabsf(hi);
  /* Bins far wider than a float32 ulp of the values (a range of at least 2**-10 of their magnitude), else A = min. */
  if (hi - lo > magnitude * 0x1p-10f && isfinite(BINS / (hi - lo))) {
    float width = (hi - lo) / BINS, scale = BINS / (hi - lo);
    j = 0;
#if defined(__AVX2__)
    if (stride == 1) {  /* the bins of 8 items a step (the same float operations), counted one by one */
      const __m256 vlo = _mm256_set1_ps(lo), vscale = _mm256_set1_ps(scale);
      int32_t bins[8];
      for (; j + 8 <= u; j += 8) {
        __m256 a = _mm256_mul_ps(_mm256_loadu_ps(row + j), _mm256_loadu_ps(inverse + j));
        _mm256_storeu_si256((__m256i *)bins, _mm256_cvttps_epi32(_mm256_mul_ps(_mm256_sub_ps(a, vlo), vscale)));
        for (int x = 0; x < 8; x++) counts[bins[x] < BINS - 1 ? bins[x] : BINS - 1]++;
      }
    }
#endif
    for (; j < u; j += stride) {
      int32_t b = (int32_t)((row[j] * inverse[j] - lo) * scale);
      counts[b < BINS - 1 ? b : BINS - 1]++;
    }
    int64_t above = 0;
    int32_t b = BINS - 1;
    for (; b > 0; b--) {
      above += counts[b];
      if (above >= k) break;
    }
    float edge = lo + (float)(b - 1) * width;
    a_bound = edge > lo ? edge : lo;
  }
  float bound = a_bound - fabsf(a_bound) * 0x1p-19f;
  return bound - 1e-30f;
}

/* fl32(dot / sqrt(|r|^2 |t|^2)) in float64, + 0.0: model.gsu.cosine.cosines, operation for operation. */
static inline float exact_score(float dot, double sq_item, double sq_target) {
  double den = sq_item * sq_target;
  if (den < 1e-300) den = 1e-300;
  return (float)((double)dot / sqrt(den)) + 0.0f;
}


static int descending(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return (x < y) - (x > y);
}

/* a[0..m) sorted descending: an insertion sort for the usual few dozen keys (few mispredictions), qsort beyond
   (a large k would make the insertion sort quadratic). */
static void sort_descending(int64_t *a, int64_t m) {
  if (m > 64) {
    qsort(a, (size_t)m, sizeof(int64_t), descending);
    return;
  }
  for (int64_t s = 1; s < m; s++) {
    int64_t key = a[s], at = s;
    while (at > 0 && a[at - 1] < key) { a[at] = a[at - 1]; at--; }
    a[at] = key;
  }
}

/* One target's k best rank keys, descending, into o [k] (INT64_MIN past the m found): row [u] its exact integer
   dots with the u items; keys [2k] scratch. The three steps of the module docstring. */
static void select_row(const float *row, int64_t u, const float *inverse, const double *sq_items, double sq_t,
                       int64_t k, int64_t stride, int64_t *keys, int64_t *o) {
  float bound = sample_bound(row, inverse, u, stride, k);
  int64_t m = 0, threshold = INT64_MIN;
  int64_t j = 0;
#if defined(__AVX2__)
  const __m256 wall = _mm256_set1_ps(bound);  /* 8 estimates a compare; the few at or above it are scored */
  for (; j + 8 <= u; j += 8) {
    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(row + j), _mm256_loadu_ps(inverse + j));
    int hits = _mm256_movemask_ps(_mm256_cmp_ps(a, wall, _CMP_GE_OQ));
    while (hits) {
      int64_t at = j + __builtin_ctz((unsigned)hits);
      hits &= hits - 1;
      offer(keys, &m, &threshold, k, rank_key(exact_score(row[at], sq_items[at], sq_t), at), 1);
    }
  }
#endif
  for (; j < u; j++)
    if (row[j] * inverse[j] >= bound)
      offer(keys, &m, &threshold, k, rank_key(exact_score(row[j], sq_items[j], sq_t), j), 1);
  if (m > k) select_top(keys, m, k), m = k;
  sort_descending(keys, m);
  for (int64_t s = 0; s < k; s++) o[s] = s < m ? keys[s] : INT64_MIN;
}

/* dots [c, u] (row stride ld) exact integer dots of c targets with u items; inverse [u] fl32(1 / |r|) (0 for zero
   rows); sq_items [u], sq_targets [c] squared norms; k <= u; the bound's sample is every stride-th item (at least
   k of them). out [c, k]: each target's k best rank keys, descending. Returns 0, or -1 when out of memory. */
int64_t muse_dense_select(const float *dots, int64_t c, int64_t u, int64_t ld, const float *inverse,
                          const double *sq_items, const double *sq_targets, int64_t k, int64_t stride, int64_t *out) {
  int64_t *keys = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * k));
  if (!keys) return -1;
  for (int64_t i = 0; i < c; i++)
    select_row(dots + i * ld, u, inverse, sq_items, sq_targets[i], k, stride, keys, out + i * k);
  free(keys);
  return 0;
}

/* The 8 accumulators' sums as float32 (exact: |dot| <= 2**24, which _dense_topk's callers guarantee), stored as
   dots of GROUP = 4 targets with items j and j + 1 into out [GROUP, u]: a[2x + y] is target x with item j + y. The
   sums: hadd pairs within each 128-bit lane, then add the lanes, giving (t0.r0, t0.r1, t1.r0, t1.r1, t2.r0, ...). */
#if defined(__AVX2__)
static inline void store_pairs(const __m256i *a, float *out, int64_t u, int64_t j) {
  __m256i q0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
  __m256i q1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[4], a[5]), _mm256_hadd_epi32(a[6], a[7]));
  __m256 s = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_permute2x128_si256(q0, q1, 0x20),
                                                 _mm256_permute2x128_si256(q0, q1, 0x31)));
  __m128 lo = _mm256_castps256_ps128(s), hi = _mm256_extractf128_ps(s, 1);
  _mm_storel_pi((__m64 *)(out + j), lo);
  _mm_storeh_pi((__m64 *)(out + u + j), lo);
  _mm_storel_pi((__m64 *)(out + 2 * u + j), hi);
  _mm_storeh_pi((__m64 *)(out + 3 * u + j), hi);
}
#endif

/* The exact dots of GROUP targets (t8 int8 [GROUP, d], and widened, t16 int16 [GROUP, d]) with u int8 items
   [u, d], as float32 into out [GROUP, u] (row stride u); every product and partial sum an integer in int32
   (|dot| <= d * 2**14). AVX2, two items at a time against the GROUP targets:
   - d % 32 == 0 and no target entry is -128: _mm256_maddubs_epi16 of |item| (unsigned, <= 128) with the target
     negated where the item is negative (|.| <= 127), so each product is item * target, and each sum of two
     products is at most 2 * 128 * 127 = 32512 in magnitude: no int16 saturation; _mm256_madd_epi16 with ones
     widens the pairs to int32. 32 products for two multiplies.
   - else d % 16 == 0: _mm256_madd_epi16 of the widened values (16 products a call, summed pairwise in int32).
   - else plain int32 C. */
enum { GROUP = 4 };
static void group_dots(const int8_t *t8, const int16_t *t16, int has_min, const int8_t *items, int64_t u,
                       int64_t d, float *out) {
  int64_t j = 0;
#if defined(__AVX2__)
  if (d % 32 == 0 && !has_min) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (; j + 2 <= u; j += 2) {
      const int8_t *r0 = items + j * d, *r1 = r0 + d;
      __m256i a[2 * GROUP];
      for (int x = 0; x < 2 * GROUP; x++) a[x] = _mm256_setzero_si256();
      for (int64_t e = 0; e < d; e += 32) {
        __m256i h0 = _mm256_loadu_si256((const __m256i *)(r0 + e)), h1 = _mm256_loadu_si256((const __m256i *)(r1 + e));
        __m256i m0 = _mm256_abs_epi8(h0), m1 = _mm256_abs_epi8(h1);
        for (int x = 0; x < GROUP; x++) {
          __m256i tt = _mm256_loadu_si256((const __m256i *)(t8 + x * d + e));
          a[2 * x] = _mm256_add_epi32(a[2 * x], _mm256_madd_epi16(_mm256_maddubs_epi16(m0, _mm256_sign_epi8(tt, h0)), ones));
          a[2 * x + 1] = _mm256_add_epi32(a[2 * x + 1],
                                          _mm256_madd_epi16(_mm256_maddubs_epi16(m1, _mm256_sign_epi8(tt, h1)), ones));
        }
      }
      store_pairs(a, out, u, j);
    }
  } else if (d % 16 == 0) {
    for (; j + 2 <= u; j += 2) {
      const int8_t *r0 = items + j * d, *r1 = r0 + d;
      __m256i a[2 * GROUP];
      for (int x = 0; x < 2 * GROUP; x++) a[x] = _mm256_setzero_si256();
      for (int64_t e = 0; e < d; e += 16) {
        __m256i x0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(r0 + e)));
        __m256i x1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(r1 + e)));
        for (int x = 0; x < GROUP; x++) {
          __m256i tt = _mm256_loadu_si256((const __m256i *)(t16 + x * d + e));
          a[2 * x] = _mm256_add_epi32(a[2 * x], _mm256_madd_epi16(x0, tt));
          a[2 * x + 1] = _mm256_add_epi32(a[2 * x + 1], _mm256_madd_epi16(x1, tt));
        }
      }
      store_pairs(a, out, u, j);
    }
  }
#endif
  for (; j < u; j++)
    for (int x = 0; x < GROUP; x++) {
      int32_t acc = 0;
      for (int64_t e = 0; e < d; e++) acc += (int32_t)t16[x * d + e] * (int32_t)items[j * d + e];
      out[x * u + j] = (float)acc;
    }
}

/* muse_dense_select of the dots of c int8 targets [c, d] with u int8 items [u, d], taken here GROUP targets at
   a time into a [GROUP, u] buffer that stays in cache while its rows are selected (no [c, u] product in memory).
   Returns 0, or -1 when out of memory. */
int64_t muse_dense_topk_i8(const int8_t *targets, int64_t c, const int8_t *items, int64_t u, int64_t d,
                           const float *inverse, const double *sq_items, const double *sq_targets, int64_t k,
                           int64_t stride, int64_t *out) {
  int64_t *keys = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * k));
  float *dots = (float *)malloc(sizeof(float) * (size_t)(GROUP * u));
  int16_t *wide = (int16_t *)malloc(sizeof(int16_t) * (size_t)(GROUP * d));
  int8_t *narrow = (int8_t *)malloc((size_t)(GROUP * d));
  if (!keys || !dots || !wide || !narrow) {
    free(keys), free(dots), free(wide), free(narrow);
    return -1;
  }
  for (int64_t i = 0; i < c; i += GROUP) {
    int64_t g = c - i < GROUP ? c - i : GROUP;
    int has_min = 0;
    for (int64_t e = 0; e < GROUP * d; e++) {  /* the group's targets, zero targets past c */
      narrow[e] = e < g * d ? targets[i * d + e] : 0;
      wide[e] = narrow[e];
      has_min |= narrow[e] == -128;
    }
    group_dots(narrow, wide, has_min, items, u, d, dots);
    for (int64_t x = 0; x < g; x++)
      select_row(dots + x * u, u, inverse, sq_items, sq_targets[i + x], k, stride, keys, out + (i + x) * k);
  }
  free(keys), free(dots), free(wide), free(narrow);
  return 0;
}

/* Each target's k best (score, position) rank keys among the occurrences of its w selected items (topk.py's
   _occurrence_keys): scores [c, w] float32 and item [c, w] (indices into the distinct items) best first; an item's
   positions are real[order[ends[i] - occurrences[i] .. ends[i] - 1]], ascending. Items are taken in order, each
   with its newest min(k, count) occurrences, until k keys are in hand and the next item scores strictly lower
   (so tied items all enter). Without a tie the keys come out descending and are cut at k; where items tie
   (their positions interleave) they go through the running top-k (a buffer of 2k) and the k best are sorted.
   out [c, k], INT64_MIN past the last. buf: scratch of 2k keys. */
void muse_occurrence_keys(const float *scores, const int64_t *item, int64_t c, int64_t w, const int64_t *occurrences,
                          const int64_t *ends, const int64_t *order, const int64_t *real, int64_t k, int64_t *buf,
                          int64_t *out) {
  for (int64_t i = 0; i < c; i++) {
    const float *s = scores + i * w;
    const int64_t *it = item + i * w;
    int64_t m = 0, threshold = INT64_MIN, sorted = 1;
    for (int64_t j = 0; j < w; j++) {
      if (j && s[j] != s[j - 1]) {
        if (m >= k) break;
      } else if (j) {
        sorted = 0;  /* a tie with the previous item: their positions interleave */
      }
      int64_t count = occurrences[it[j]] < k ? occurrences[it[j]] : k, end = ends[it[j]];
      /* without a tie m stays below 2k (under k before an item of at most k keys): the buffer is never cut */
      for (int64_t n = 0; n < count; n++) offer(buf, &m, &threshold, k, rank_key(s[j], real[order[end - 1 - n]]), 1);
    }
    if (!sorted) {
      if (m > k) select_top(buf, m, k), m = k;
      sort_descending(buf, m);
    }
    int64_t *o = out + i * k;
    for (int64_t x = 0; x < k; x++) o[x] = x < m ? buf[x] : INT64_MIN;
  }
}
"""

_SIGNATURES = {"muse_dense_select": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                    ctypes.c_int64, ctypes.c_void_p]),
               "muse_occurrence_keys": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                               ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                               ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]),
               "muse_dense_topk_i8": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                                     ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                                     ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p])}
# LIBRARY.reason(): why it is not built here.
LIBRARY = cbuild.Library("muse_dense", SOURCE.replace("@RUNNING_TOPK@", RUNNING_TOPK_C), _SIGNATURES)


def _valid(c: int, u: int, inverse: torch.Tensor, sq_items: torch.Tensor, sq_targets: torch.Tensor, k: int,
           stride: int) -> bool:
    """Whether a selection of the k best of u items for c targets can run: 1 <= k <= u, a stride >= 1 that samples
    at least k items, and norms of the right lengths (the C loops read that many values)."""
    return (1 <= k <= u and stride >= 1 and (u + stride - 1) // stride >= k and inverse.numel() == u
            and sq_items.numel() == u and sq_targets.numel() == c)


def select_keys(dots: torch.Tensor, inverse: torch.Tensor, sq_items: torch.Tensor, sq_targets: torch.Tensor, k: int,
                stride: int) -> Optional[torch.Tensor]:
    """int64 [C, k] rank keys, descending (module docstring), or None when the kernel is not available.

    dots: float32 [C, U] exact integer dots, rows contiguous; inverse: float32 [U]; sq_items [U], sq_targets [C]:
    squared norms (taken in float64, as ``cosines`` takes them); 1 <= k <= U; stride: the bound's sample is every
    stride-th item (U // stride >= k)."""
    function = LIBRARY.function("muse_dense_select")
    if function is None:
        return None
    c, u = dots.shape
    if dots.stride(1) != 1 or not _valid(c, u, inverse, sq_items, sq_targets, k, stride):
        raise ValueError(f"dots {tuple(dots.shape)} (stride {dots.stride()}), k {k}, stride {stride}: "
                         "not a valid selection")
    inverse = inverse.to(torch.float32).contiguous()
    sq_items, sq_targets = sq_items.double().contiguous(), sq_targets.double().contiguous()
    out = torch.empty(c, k, dtype=torch.int64)
    if function(dots.data_ptr(), c, u, dots.stride(0), inverse.data_ptr(), sq_items.data_ptr(), sq_targets.data_ptr(),
                k, stride, out.data_ptr()) != 0:
        raise MemoryError(f"muse_dense_select: no memory for {u} keys")
    return out


def topk_i8(targets: torch.Tensor, items: torch.Tensor, inverse: torch.Tensor, sq_items: torch.Tensor,
            sq_targets: torch.Tensor, k: int, stride: int) -> Optional[torch.Tensor]:
    """``select_keys`` of the dots of int8 targets [C, D] with int8 items [U, D], the dots taken in the same C call
    (int32 products, ``GROUP`` targets at a time, never a [C, U] float32 product): int64 [C, k] rank keys,
    descending, bit-identical to ``select_keys(targets.float() @ items.float().T, ...)``; None when the kernel is
    not available. The dots must be exact in float32 (``model.gsu.kernels.float32_exact``)."""
    function = LIBRARY.function("muse_dense_topk_i8")
    if function is None:
        return None
    (c, d), u = targets.shape, items.shape[0]
    if targets.dtype != torch.int8 or items.dtype != torch.int8 or items.shape[1] != d \
            or not _valid(c, u, inverse, sq_items, sq_targets, k, stride):
        raise ValueError(f"targets {tuple(targets.shape)} {targets.dtype}, items {tuple(items.shape)} {items.dtype}, "
                         f"k {k}, stride {stride}: not a valid selection")
    targets, items = targets.contiguous(), items.contiguous()
    inverse = inverse.to(torch.float32).contiguous()
    sq_items, sq_targets = sq_items.double().contiguous(), sq_targets.double().contiguous()
    out = torch.empty(c, k, dtype=torch.int64)
    if function(targets.data_ptr(), c, items.data_ptr(), u, d, inverse.data_ptr(), sq_items.data_ptr(),
                sq_targets.data_ptr(), k, stride, out.data_ptr()) != 0:
        raise MemoryError(f"muse_dense_topk_i8: no memory for {u} dots")
    return out


def occurrence_keys(scores: torch.Tensor, item: torch.Tensor, occurrences: torch.Tensor, ends: torch.Tensor,
                    order: torch.Tensor, real: torch.Tensor, k: int) -> Optional[torch.Tensor]:
    """``model.gsu.topk._occurrence_keys`` in one C loop (the same int64 [C, k] keys), or None where the library is
    not built. scores float32 [C, w], item int64 [C, w]; occurrences, ends int64 [items]; order, real int64 [n]."""
    function = LIBRARY.function("muse_occurrence_keys")
    if function is None:
        return None
    c, w = item.shape
    scores = scores.to(torch.float32).contiguous()
    item, occurrences, ends, order, real = (t.to(torch.int64).contiguous() for t in (item, occurrences, ends, order, real))
    buf = torch.empty(2 * k, dtype=torch.int64)
    out = torch.empty(c, k, dtype=torch.int64)
    function(scores.data_ptr(), item.data_ptr(), c, w, occurrences.data_ptr(), ends.data_ptr(), order.data_ptr(),
             real.data_ptr(), k, buf.data_ptr(), out.data_ptr())
    return out
