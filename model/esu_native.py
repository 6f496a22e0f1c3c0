"""Native (C) kernels for the ESU at serving: the target attention over behaviors given by index
(``TargetAttention.forward_shared``) and SimTier's tier counts (``simtier.tier_counts``).

Why: a 1,000-candidate rank attends over 50,000 (candidate, selected behavior) slots. In torch that is a gather of
every slot's key and value rows out of the U distinct ones ([C, K, E] tensors written and read back), a product,
a sum, the SA-TA combination, a masked softmax and a batched product: a dozen passes over [C, K] and [C, K, E]
arrays. ``attend`` takes each candidate's K slots in one pass, reading the rows from the small [U, .] tables in
cache. SimTier's counts (a tier per score: a guess and two corrections, then a scatter-add) become one loop.

Exactness: ``tier_counts`` gives the torch counts exactly (the same tier of every score, ``simtier.tiers_of``'s rule,
and integer counts). ``attend`` equals the torch path up to float32 rounding: its dots, exponentials and sums are
taken in another order (tests: 1e-6). Inference only: no gradient flows through a C call, so callers use these
only where no input needs one. Built and loaded like the other kernels (``model.gsu.cbuild``); each function is
None where no C compiler builds it, and the callers run their torch ops.
"""

import ctypes
from typing import Optional

import torch

from model.gsu import cbuild
from model.simd_c import DOT8_C

SOURCE = r"""
#include <stdint.h>
#include <math.h>
#include <float.h>

""" + DOT8_C + r"""
/* out [b, e]: for each row i, a_j = scale * (q_i . keys[index[i, j]]) over its valid slots j (index >= 0), with
   SA-TA (aware) a_j = g0 a_j + g1 r_j + g2 a_j r_j (r = sim [b, k]), then softmax over the valid slots and the
   weighted sum of values[index[i, j]]; zeros for a row without a valid slot. q [b, a_dim], keys [u, a_dim],
   values [u, e]. Returns the first flat slot whose index is >= u (nothing written), else -1. */
int64_t muse_esu_attend(const float *q, int64_t b, int64_t a_dim, const float *keys, const float *values, int64_t u,
                        int64_t e, const int64_t *index, int64_t k, const float *sim, int64_t aware, float g0, float g1,
                        float g2, float scale, float *weights, float *out) {
  for (int64_t s = 0; s < b * k; s++)
    if (index[s] >= u) return s;
  for (int64_t i = 0; i < b; i++) {
    const float *qi = q + i * a_dim;
    const int64_t *slot = index + i * k;
    const float *r = sim + i * k;
    float *o = out + i * e;
    int64_t valid = 0;
    for (int64_t j = 0; j < k; j++) valid += slot[j] >= 0;
    /* as masked_softmax: a masked slot holds float32's lowest value, in the max and (as exp(lowest - max), 0 unless
       every valid logit is -inf) in the sum, and gets no weight */
    float top = valid < k ? -FLT_MAX : -INFINITY;
    for (int64_t j = 0; j < k; j++) {
      if (slot[j] < 0) continue;
      float a = dot8(qi, keys + slot[j] * a_dim, a_dim) * scale;
      if (aware) a = g0 * a + g1 * r[j] + g2 * a * r[j];
      weights[j] = a;
      top = a > top ? a : top;
    }
    for (int64_t d = 0; d < e; d++) o[d] = 0.0f;
    if (!valid) continue;
    float total = (float)(k - valid) * expf(-FLT_MAX - top);
    for (int64_t j = 0; j < k; j++) {
      if (slot[j] < 0) continue;
      weights[j] = expf(weights[j] - top);
      total += weights[j];
    }
    for (int64_t j = 0; j < k; j++) {
      if (slot[j] < 0) continue;
      const float *v = values + slot[j] * e;
      float w = weights[j] / total;
      for (int64_t d = 0; d < e; d++) o[d] += w * v[d];
    }
  }
  return -1;
}

/* counts [b, t] (overwritten): per row, how many valid scores (mask) fall in each tier; tier of s: the guess
   floor((s + 1) * inv_width) clamped to [0, t - 1], one tier down if s < bounds[guess], one up if
   s >= bounds[guess + 1], at most t - 1 (bounds [t + 1]: -inf, the inner edges, +inf; NaN counts as +inf). */
void muse_tier_counts(const float *scores, const uint8_t *mask, int64_t b, int64_t n, const float *bounds, int64_t t,
                      double inv_width, float *counts) {
  for (int64_t i = 0; i < b; i++) {
    float *c = counts + i * t;
    for (int64_t x = 0; x < t; x++) c[x] = 0.0f;
    for (int64_t j = 0; j < n; j++) {
      if (!mask[i * n + j]) continue;
      float s = scores[i * n + j];
      if (isnan(s)) s = INFINITY;
      double g = floor(((double)s + 1.0) * inv_width);
      int64_t tier = g < 0.0 ? 0 : g > (double)(t - 1) ? t - 1 : (int64_t)g;
      if (s < bounds[tier]) tier--;
      if (s >= bounds[tier + 1]) tier++;
      c[tier < t - 1 ? tier : t - 1] += 1.0f;
    }
  }
}
"""

_SIGNATURES = {
    "muse_esu_attend": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                         ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                         ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float,
                                         ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_void_p,
                                         ctypes.c_void_p]),
    "muse_tier_counts": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                ctypes.c_int64, ctypes.c_double, ctypes.c_void_p]),
}
LIBRARY = cbuild.Library("muse_esu", SOURCE, _SIGNATURES)  # LIBRARY.reason(): why it is not built here


def _plain(*tensors: torch.Tensor) -> bool:
    """Whether the C kernels may take these: CPU tensors, none needing a gradient."""
    grad = torch.is_grad_enabled()
    return all(t.device.type == "cpu" and not (grad and t.requires_grad) for t in tensors)


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
           similarity: Optional[torch.Tensor], gates: Optional[torch.Tensor], scale: float) -> Optional[torch.Tensor]:
    """Pooled [B, E] of ``TargetAttention.forward_shared`` from its parts, or None where the kernel does not apply
    (not built, a gradient needed, not float32 on the CPU): query [B, A] (the query vectors), keys [U, A] and
    values [U, E] (the distinct behaviors' rows), index int64 [B, K] (-1: no behavior), similarity [B, K] (R,
    already over the temperature; SA-TA only, with ``gates`` [3]), ``scale`` on the dot. IndexError for an index
    >= U."""
    function = LIBRARY.function("muse_esu_attend")
    tensors = [query, keys, values] + ([similarity, gates] if gates is not None else [])
    if function is None or not _plain(*tensors) or any(t.dtype != torch.float32 for t in tensors):
        return None
    b, k = index.shape
    (u, a_dim), e = keys.shape, values.shape[1]
    query, keys, values = query.contiguous(), keys.contiguous(), values.contiguous()
    index = index.to(torch.int64).contiguous()
    aware = gates is not None
    sim = similarity.contiguous() if aware else torch.zeros(1)
    g = [float(x) for x in gates.tolist()] if aware else [0.0, 0.0, 0.0]
    out = torch.empty(b, e, dtype=torch.float32)
    weights = torch.empty(max(1, k), dtype=torch.float32)
    bad = function(query.data_ptr(), b, a_dim, keys.data_ptr(), values.data_ptr(), u, e, index.data_ptr(), k,
                   sim.data_ptr(), int(aware), g[0], g[1], g[2], float(scale), weights.data_ptr(), out.data_ptr())
    if bad >= 0:
        raise IndexError(f"index: slot {bad} points at behavior {int(index.view(-1)[bad])} of {u}")
    return out


def tier_counts(scores: torch.Tensor, mask: torch.Tensor, bounds: torch.Tensor, width: float) -> Optional[torch.Tensor]:
    """float32 [B, T] valid scores per tier (``simtier.tier_counts``), or None where the kernel does not apply
    (not built, not float32 on the CPU): scores [B, N], mask bool [B, N], bounds float32 [T + 1] (-inf, the inner
    edges, +inf). Counts carry no gradient, so a gradient elsewhere does not matter."""
    function = LIBRARY.function("muse_tier_counts")
    if function is None or scores.dtype != torch.float32 or scores.device.type != "cpu" or mask.shape != scores.shape:
        return None
    b, n = scores.shape
    t = bounds.shape[0] - 1
    scores, mask = scores.detach().contiguous(), mask.to(torch.bool).contiguous()
    bounds = bounds.to(torch.float32).contiguous()
    counts = torch.empty(b, t, dtype=torch.float32)
    function(scores.data_ptr(), mask.data_ptr(), b, n, bounds.data_ptr(), t, 1.0 / width, counts.data_ptr())
    return counts
