"""``RUNNING_TOPK_C``: ``model.gsu.ranking`` in C, for the native kernels (``model.gsu.pq_native``,
``model.gsu.dense_select``): ``rank_key`` is ``rank_keys`` of one score (the same int64, bit for bit), and
``offer`` / ``select_top`` keep a running top-k of distinct keys (a buffer of 2k, cut to its k largest by a
branchless quickselect when full). The source needs <stdint.h>; a kernel pastes it in where it says
``@RUNNING_TOPK@``. (A module of its own: ``ranking`` imports the GSU's torch modules, the kernels must not.)
"""

RUNNING_TOPK_C = r"""
/* The rank key of a float32 score (no NaN, no -0.0) at a position: order-preserving bits << 32 | position. */
static inline int64_t rank_key(float s, int64_t position) {
  union { float f; int32_t i; } u;
  u.f = s;
  int32_t ordered = u.i ^ ((u.i >> 31) & 0x7FFFFFFF);
  return (int64_t)(((uint64_t)(int64_t)ordered << 32) | (uint64_t)position);
}

/* Put the k largest of a[0..n) (distinct keys, n >= k >= 1) first, in any order: quickselect with a branchless
   Lomuto partition (every element swapped, the front advanced by the comparison: no mispredicted branch per
   element), median-of-3 pivot. */
static void select_top(int64_t *a, int64_t n, int64_t k) {
  int64_t lo = 0, hi = n;  /* the k-th largest lies in [lo, hi) */
  while (hi - lo > 1) {
    int64_t mid = lo + (hi - lo) / 2, last = hi - 1, x = a[lo], y = a[mid], z = a[last];
    int64_t pick = (x > y) ? ((y > z) ? mid : (x > z ? last : lo)) : ((x > z) ? lo : (y > z ? last : mid));
    int64_t p = a[pick], j = lo;
    a[pick] = a[last];
    a[last] = p;
    for (int64_t i = lo; i < last; i++) {
      int64_t v = a[i];
      a[i] = a[j];
      a[j] = v;
      j += v > p;
    }
    a[last] = a[j];
    a[j] = p;  /* a[lo..j) > p, a[j] = p, a(j..hi) < p */
    if (j + 1 == k) return;
    if (j + 1 > k) hi = j;
    else lo = j + 1;
  }
}

/* One target's running top-K': keys in buf[0..*count) (capacity 2 * kprime), every key not there is <= *thr
   and so outside the top K' (keys are distinct). A key above the threshold (and kept: not padding) is appended
   without a branch (written always, the count advanced by the comparison); a full buffer is cut to its K'
   largest, whose smallest becomes the threshold. */
static inline void offer(int64_t *buf, int64_t *count, int64_t *thr, int64_t kprime, int64_t key, int keep) {
  buf[*count] = key;
  *count += (key > *thr) & keep;
  if (*count == 2 * kprime) {
    select_top(buf, *count, kprime);
    int64_t least = buf[0];
    for (int64_t i = 1; i < kprime; i++) least = buf[i] < least ? buf[i] : least;
    *thr = least;
    *count = kprime;
  }
}
"""
