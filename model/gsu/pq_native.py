"""A native (C) ADC scan for the approximate GSU (``model.gsu.pq_topk``): a history's uint8 codes gathered by
item id, each behavior's estimate summed from its targets' lookup tables, and each target's running top-K'
rank keys kept in C, in one pass, without a [B, L] tensor of estimates or a top-K' over it.

Why: the torch path (one ``embedding_bag`` over codes offset into the lookup tables, then a threshold, a
``nonzero`` and a ``topk`` merge) materialises the gathered codes, the bag indices and the estimates, and reads
each of them again; at L = 100,000 that cost more than the exact GSU's native filter. Here the codes are
prefetched ``_PREFETCH`` ids ahead (16 B per item at M = 16: a cache line holds 4 items' codes), a target's lookup
table (M x 256 float32: 16 KB at M = 16) stays in L1, a single target's history is summed 8 behaviors at a time
(8 independent chains of M adds), and a behavior whose estimate is below the running threshold costs one
comparison. Running top-K': a buffer of 2 K' keys per target; a key above the threshold is appended, and a full
buffer is cut to its K' largest by quickselect, whose smallest becomes the threshold (amortised O(1) per key).

Same numbers as the torch path, bit for bit: each estimate is the float32 sum of the M entries in subspace order
(0 + LUT[0, c0] + LUT[1, c1] + ...: ``embedding_bag``'s order; no multiply, so no FMA contraction applies),
clamped to [-1, 1], + 0.0 (no -0.0); its rank key is ``model.gsu.ranking.rank_keys``' (ordered score bits << 32
| position); padding (id 0) is skipped; the K' largest keys are a set (one position per key, so no two are
equal), the same whatever the visiting order. Targets sharing a history read its codes once per block of 32
targets: the lookup tables are laid out [M * 256, G] (entry (m, c) holds G consecutive floats, one per target),
summed into an accumulator per target.

``muse_pair_dots_i8`` gives the re-scoring's exact int8 dots of B x K' (candidate, target) pairs, rows gathered
by id (prefetched), int32 sums: the same integers as every other exact kernel (|dot| <= D * 2**14 < 2**31).

Built and cached by ``model.gsu.cbuild`` (``muse_pq_<hash>.so``; portable C, auto-vectorised with ``-mavx2``
where the CPU has it); ``library()`` is None with the reason where it cannot be built, and ``model.gsu.kernels``
then offers only the torch scan.
"""

import ctypes
from typing import Dict, Optional

import torch

from model.gsu import cbuild
from model.gsu.rank_keys_c import RUNNING_TOPK_C

_PREFETCH = 32
LUT_CODES = 256  # entries per subspace in the native lookup table (every uint8 code; unused ones are 0)
_TARGET_BLOCK = 32  # targets summed per pass over a behavior's codes (an accumulator of 32 floats)

SOURCE = r"""
#include <stdint.h>

#define PREFETCH @PREFETCH@
#define BLOCK @BLOCK@

@RUNNING_TOPK@
static inline float clamp_unit(float s) {
  s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
  return s + 0.0f;
}

/* A behavior's estimate for one target: 0 + lut[c0] + lut[256 + c1] + ..., in subspace order. */
static inline float estimate(const float *lut, const uint8_t *c, int64_t m_) {
  float s = 0.0f;
  for (int64_t m = 0; m < m_; m++) s += lut[m * 256 + c[m]];
  return s;
}

/* The single-target scan of positions [0, n), 8 behaviors at a time: their 8 sums are independent chains the
   core overlaps (one behavior's M dependent adds alone would bound the loop by the add latency). Returns the
   first position it did not scan. */
static int64_t scan8(const uint8_t *codes, int64_t m_, const int64_t *ids, int64_t n, const float *lut,
                     int64_t *buf, int64_t *count, int64_t *thr, int64_t kprime) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; k++)
      if (i + PREFETCH + k < n) __builtin_prefetch(codes + ids[i + PREFETCH + k] * m_);
    const uint8_t *c[8];
    float e[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int k = 0; k < 8; k++) c[k] = codes + ids[i + k] * m_;
    for (int64_t m = 0; m < m_; m++) {
      const float *b = lut + m * 256;
      for (int k = 0; k < 8; k++) e[k] += b[c[k][m]];
    }
    for (int k = 0; k < 8; k++) offer(buf, count, thr, kprime, rank_key(clamp_unit(e[k]), i + k), ids[i + k] != 0);
  }
  return i;
}

/* One history ids[0..n) for g targets: estimate_j = 0 + sum_m lut[(m * 256 + codes[id * m_ + m]) * g + j]
   (float32, m in order), clamped to [-1, 1], + 0.0; target j keeps the kprime largest rank keys (score,
   position) of the non-padding positions in out[rows[j] * kprime ..] (any order; INT64_MIN where it has fewer).
   work: int64 [g, 2 * kprime] scratch. The ids are checked by the caller. */
static void scan_history(const uint8_t *codes, int64_t m_, const int64_t *ids, int64_t n, const float *lut,
                         int64_t g, const int64_t *rows, int64_t *out, int64_t kprime, int64_t *work) {
  int64_t counts[BLOCK], thrs[BLOCK];
  float acc[BLOCK];
  for (int64_t j0 = 0; j0 < g; j0 += BLOCK) {  /* a block of targets per pass over the codes */
    int64_t w = g - j0 < BLOCK ? g - j0 : BLOCK;
    for (int64_t j = 0; j < w; j++) { counts[j] = 0; thrs[j] = INT64_MIN; }
    int64_t start = g == 1 ? scan8(codes, m_, ids, n, lut, work, counts, thrs, kprime) : 0;
    for (int64_t i = start; i < n; i++) {
      if (i + PREFETCH < n) __builtin_prefetch(codes + ids[i + PREFETCH] * m_);
      int64_t id = ids[i];
      const uint8_t *c = codes + id * m_;
      if (g == 1) {
        float s = estimate(lut, c, m_);
        offer(work, counts, thrs, kprime, rank_key(clamp_unit(s), i), id != 0);
        continue;
      }
      if (id == 0) continue;
      for (int64_t j = 0; j < w; j++) acc[j] = 0.0f;
      for (int64_t m = 0; m < m_; m++) {
        const float *e = lut + (m * 256 + c[m]) * g + j0;
        for (int64_t j = 0; j < w; j++) acc[j] += e[j];
      }
      for (int64_t j = 0; j < w; j++)
        offer(work + (j0 + j) * 2 * kprime, counts + j, thrs + j, kprime, rank_key(clamp_unit(acc[j]), i), 1);
    }
    for (int64_t j = 0; j < w; j++) {
      int64_t *buf = work + (j0 + j) * 2 * kprime, *o = out + rows[j0 + j] * kprime;
      if (counts[j] > kprime) select_top(buf, counts[j], kprime);
      int64_t kept = counts[j] < kprime ? counts[j] : kprime;
      for (int64_t i = 0; i < kprime; i++) o[i] = i < kept ? buf[i] : INT64_MIN;
    }
  }
}

/* Every group q of samples sharing a history: samples members[starts[q] .. starts[q + 1]), history row
   history[q * length ..] (ids, 0 = padding), sample b's lookup table luts[b * m_ * 256 ..]
   ([m_, 256] float32). Writes out[b * kprime ..] for every listed sample (see scan_history). A group of g > 1
   samples is scanned once for all of them from its tables transposed into lut_work ([m_ * 256, g]).
   work: int64 [gmax, 2 * kprime]; lut_work: float32 [m_ * 256 * gmax] (gmax: the largest group).
   Every id of every history is checked first: returns the first flat index (q * length + i) outside [0, rows)
   before anything is scanned, else -1. */
int64_t muse_pq_scan(const uint8_t *codes, int64_t rows, int64_t m_, const int64_t *history, int64_t length,
                     const float *luts, const int64_t *members, const int64_t *starts, int64_t groups,
                     int64_t *out, int64_t kprime, int64_t *work, float *lut_work) {
  for (int64_t f = 0; f < groups * length; f++)
    if (history[f] < 0 || history[f] >= rows) return f;
  int64_t entries = m_ * 256;
  for (int64_t q = 0; q < groups; q++) {
    const int64_t *mine = members + starts[q];
    int64_t g = starts[q + 1] - starts[q];
    const int64_t *ids = history + q * length;
    if (q + 1 < groups) {  /* the next history's first codes, which its own scan cannot prefetch ahead */
      const int64_t *next = ids + length;
      for (int64_t i = 0; i < PREFETCH && i < length; i++) __builtin_prefetch(codes + next[i] * m_);
    }
    if (g == 1) {
      scan_history(codes, m_, ids, length, luts + mine[0] * entries, 1, mine, out, kprime, work);
      continue;
    }
    for (int64_t j = 0; j < g; j++) {
      const float *src = luts + mine[j] * entries;
      for (int64_t e = 0; e < entries; e++) lut_work[e * g + j] = src[e];
    }
    scan_history(codes, m_, ids, length, lut_work, g, mine, out, kprime, work);
  }
  return -1;
}

/* out[b * k + i] = sum_d table[ids[b * k + i] * width + d] * table[targets[b] * width + d] (int32) for b < batch,
   i < k. Every id is checked first: returns the first flat index of ids (or batch * k + b for targets[b])
   outside [0, rows), else -1. */
int64_t muse_pair_dots_i8(const int8_t *table, int64_t rows, int64_t width, const int64_t *ids, int64_t batch,
                          int64_t k, const int64_t *targets, int32_t *out) {
  int64_t n = batch * k;
  for (int64_t i = 0; i < n; i++)
    if (ids[i] < 0 || ids[i] >= rows) return i;
  for (int64_t b = 0; b < batch; b++)
    if (targets[b] < 0 || targets[b] >= rows) return n + b;
  for (int64_t b = 0; b < batch; b++) {
    const int8_t *t = table + targets[b] * width;
    for (int64_t i = 0; i < k; i++) {
      int64_t f = b * k + i;
      if (f + PREFETCH < n) {
        const int8_t *p = table + ids[f + PREFETCH] * width;
        for (int64_t off = 0; off < width; off += 64) __builtin_prefetch(p + off);
      }
      const int8_t *r = table + ids[f] * width;
      int32_t s = 0;
      for (int64_t d = 0; d < width; d++) s += (int32_t)r[d] * (int32_t)t[d];
      out[f] = s;
    }
  }
  return -1;
}
"""

_SIGNATURES = {
    "muse_pq_scan": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                      ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]),
    "muse_pair_dots_i8": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                           ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]),
}
LIBRARY = cbuild.Library("muse_pq", SOURCE.replace("@PREFETCH@", str(_PREFETCH)).replace("@BLOCK@", str(_TARGET_BLOCK))
                         .replace("@RUNNING_TOPK@", RUNNING_TOPK_C), _SIGNATURES)


def library() -> Optional[Dict[str, object]]:
    """The compiled functions (``muse_pq_scan``, ``muse_pair_dots_i8``), built and loaded once per process
    (``LIBRARY``); None when they cannot be built here (``unavailable_reason()`` says why)."""
    return LIBRARY.functions()


def unavailable_reason() -> str:
    """Why ``library()`` is None ("" when it loaded)."""
    return LIBRARY.reason()


def _functions() -> Dict[str, object]:
    functions = library()
    if functions is None:
        raise RuntimeError(f"native PQ kernel unavailable: {unavailable_reason()}")
    return functions


def scan(codes: torch.Tensor, history: torch.Tensor, luts: torch.Tensor, groups: torch.Tensor, starts: torch.Tensor,
         out: torch.Tensor) -> int:
    """Scan the histories of groups of samples: out int64 [B, K'] row b = sample b's K' largest rank keys (any
    order, ``NO_KEY`` where it has fewer non-padding behaviors), for every sample listed in ``groups``.

    codes: uint8 [N, M]; history: int64 [Q, L], row q the history of group q (0 = padding, skipped; position =
    column); luts: float32 [B, M * LUT_CODES] (sample b's entry (m, c) at m * 256 + c); groups: int64 [S] sample
    indices, group q = groups[starts[q]:starts[q + 1]] (samples sharing history row q, read once for all of
    them); starts: int64 [Q + 1]. All contiguous. Returns -1, or the first flat index of ``history`` outside [0, N).
    """
    batch, width = out.shape
    m = codes.shape[1]
    if luts.shape != (batch, m * LUT_CODES) or history.shape[0] != starts.shape[0] - 1:
        raise ValueError(f"luts {tuple(luts.shape)}, history {tuple(history.shape)}: expected [{batch}, {m * LUT_CODES}] "
                         f"and one row per group ({starts.shape[0] - 1})")
    largest = int((starts[1:] - starts[:-1]).max()) if starts.shape[0] > 1 else 1
    work = torch.empty(largest, 2 * width, dtype=torch.int64)
    lut_work = torch.empty(largest * m * LUT_CODES if largest > 1 else 1, dtype=torch.float32)
    return int(_functions()["muse_pq_scan"](codes.data_ptr(), codes.shape[0], m, history.data_ptr(), history.shape[1],
                                             luts.data_ptr(), groups.data_ptr(), starts.data_ptr(), starts.shape[0] - 1,
                                             out.data_ptr(), width, work.data_ptr(), lut_work.data_ptr()))


def pair_dots(table: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor, out: torch.Tensor) -> int:
    """out int32 [B, K] = exact dots of rows ``ids`` int64 [B, K] of ``table`` int8 [N, D] with rows ``targets``
    int64 [B]. All contiguous. Returns -1, or the first flat index of ``ids`` (B * K + b for ``targets[b]``)
    outside [0, N)."""
    batch, k = ids.shape
    return int(_functions()["muse_pair_dots_i8"](table.data_ptr(), table.shape[0], table.shape[1], ids.data_ptr(),
                                                  batch, k, targets.data_ptr(), out.data_ptr()))
