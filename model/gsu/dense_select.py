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
  for (int64_t j = stride; j < u; j += stride) {
    float a = row[j] * inverse[j];
    lo = a < lo ? a : lo;
    hi = a > hi ? a : hi;
  }
  float a_bound = lo, magnitude = fabsf(lo) > fabsf(hi) ? fabsf(lo) : fabsf(hi);
  /* Bins far wider than a float32 ulp of the values (a range of at least 2**-10 of their magnitude), else A = min. */
  if (hi - lo > magnitude * 0x1p-10f && isfinite(BINS / (hi - lo))) {
    float width = (hi - lo) / BINS, scale = BINS / (hi - lo);
    for (int64_t j = 0; j < u; j += stride) {
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


/* dots [c, u] (row stride ld) exact integer dots of c targets with u items; inverse [u] fl32(1 / |r|) (0 for zero
   rows); sq_items [u], sq_targets [c] squared norms; k <= u; the bound's sample is every stride-th item (at least
   k of them). out [c, k]: each target's k best rank keys, descending. Returns 0, or -1 when out of memory. */
int64_t muse_dense_select(const float *dots, int64_t c, int64_t u, int64_t ld, const float *inverse,
                          const double *sq_items, const double *sq_targets, int64_t k, int64_t stride, int64_t *out) {
  int64_t *keys = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * k));
  if (!keys) return -1;
  for (int64_t i = 0; i < c; i++) {
    const float *row = dots + i * ld;
    float bound = sample_bound(row, inverse, u, stride, k);
    double sq_t = sq_targets[i];
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
    for (int64_t s = 1; s < m; s++) {  /* insertion sort, descending: k is small, and it has few mispredictions */
      int64_t key = keys[s], at = s;
      while (at > 0 && keys[at - 1] < key) { keys[at] = keys[at - 1]; at--; }
      keys[at] = key;
    }
    int64_t *o = out + i * k;
    for (int64_t s = 0; s < k; s++) o[s] = s < m ? keys[s] : INT64_MIN;
  }
  free(keys);
  return 0;
}
"""

_SIGNATURES = {"muse_dense_select": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                    ctypes.c_int64, ctypes.c_void_p])}
# LIBRARY.reason(): why it is not built here.
LIBRARY = cbuild.Library("muse_dense", SOURCE.replace("@RUNNING_TOPK@", RUNNING_TOPK_C), _SIGNATURES)


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
    if dots.stride(1) != 1 or not 1 <= k <= u or (u + stride - 1) // stride < k:
        raise ValueError(f"dots {tuple(dots.shape)} (stride {dots.stride()}), k {k}, stride {stride}: "
                         "not a valid selection")
    inverse = inverse.to(torch.float32).contiguous()
    sq_items, sq_targets = sq_items.double().contiguous(), sq_targets.double().contiguous()
    out = torch.empty(c, k, dtype=torch.int64)
    if function(dots.data_ptr(), c, u, dots.stride(0), inverse.data_ptr(), sq_items.data_ptr(), sq_targets.data_ptr(),
                k, stride, out.data_ptr()) != 0:
        raise MemoryError(f"muse_dense_select: no memory for {u} keys")
    return out
