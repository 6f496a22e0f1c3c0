"""A native (C) kernel for serving's DIN: the attention MLP of B queries against the same U keys, whole, in one call
(``DinAttention.shared_weights`` when every hidden layer is Linear + Dice and the kernel builds here).

Why: a 1,000-candidate rank scores 50,000 (candidate, recent behavior) pairs; in torch that is a dozen operations
per block of ~4K pairs (broadcast adds, the pairwise products, two products, two Dice passes, the score layer),
each writing its [pairs, H] activations out and reading them back. Here the pairs go six at a time (tiles may cross
queries) through every layer in registers and a few KB of buffers: the first layer is query term + key term +
(q * k) W_p^T (``DinAttention._first_layer``'s factorisation), each later layer W h + b, Dice after each (eval
arithmetic, the 8-lane Dice of ``model.dice_native``), then the score layer. The products are 6 x 16 register tiles
with fused multiply-adds where the CPU has FMA (chosen at run time; plain AVX2 otherwise; plain C without AVX2).
``muse bench kernels`` times it against the torch blocks it replaces (1.25x on this AVX2 host, docs/serving.md).

Widths that are not multiples of 8 are zero-padded by ``scores`` (a padded unit is 0 before and after Dice and has
zero weight in the next layer). Equal to the torch path within float32 rounding (tests: 1e-5 on the pre-softmax
scores). ``scores`` returns None where the kernel is not built or the MLP is not Linear + Dice throughout; the
caller then runs the torch blocks.
"""

import ctypes
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from model.dice_native import DICE8_C
from model.simd_c import DOT8_C
from model.gsu import cbuild
from model.tower import Dice, cached

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define ROWS 6 /* (query, key) pairs a tile: 12 accumulators of 8 lanes */
""" + DOT8_C + r"""

static inline float dice1(float v, float inv, float shift, float alpha, float oma) {
  float p = 1.0f / (1.0f + expf(-(v * inv + shift)));
  return v * (alpha + p * oma);
}

#if defined(__AVX2__)
#include <immintrin.h>
""" + DICE8_C + r"""
/* The tile product and Dice, written once over MADD(a, b, c) = a * b + c: plain AVX2 and, where the CPU has it,
   FMA (compiled for that target only, chosen at run time). tile: C[r, 0:N] += sum_k A[r, k] WT[k, 0:N] for
   ROWS rows (N a multiple of 8); dice: x[r, 0:N] <- Dice(x) with params p = [4, N]. */
#define DIN_AVX2(SUFFIX, ATTR, MADD)                                                                          \
  ATTR static void tile_##SUFFIX(const float *A, int64_t lda, int64_t K, const float *WT, int64_t N, float *C,   \
                                 int64_t ldc) {                                                              \
    int64_t c = 0;                                                                                            \
    for (; c + 16 <= N; c += 16) {                                                                            \
      __m256 a0[ROWS], a1[ROWS];                                                                              \
      for (int r = 0; r < ROWS; r++) {                                                                        \
        a0[r] = _mm256_loadu_ps(C + r * ldc + c);                                                             \
        a1[r] = _mm256_loadu_ps(C + r * ldc + c + 8);                                                         \
      }                                                                                                       \
      const float *w = WT + c;                                                                                \
      for (int64_t k = 0; k < K; k++, w += N) {                                                               \
        __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);                                          \
        for (int r = 0; r < ROWS; r++) {                                                                      \
          __m256 x = _mm256_broadcast_ss(A + r * lda + k);                                                    \
          a0[r] = MADD(x, w0, a0[r]);                                                                         \
          a1[r] = MADD(x, w1, a1[r]);                                                                         \
        }                                                                                                     \
      }                                                                                                       \
      for (int r = 0; r < ROWS; r++) {                                                                        \
        _mm256_storeu_ps(C + r * ldc + c, a0[r]);                                                             \
        _mm256_storeu_ps(C + r * ldc + c + 8, a1[r]);                                                         \
      }                                                                                                       \
    }                                                                                                         \
    for (; c + 8 <= N; c += 8) {                                                                              \
      __m256 a0[ROWS];                                                                                        \
      for (int r = 0; r < ROWS; r++) a0[r] = _mm256_loadu_ps(C + r * ldc + c);                                \
      const float *w = WT + c;                                                                                \
      for (int64_t k = 0; k < K; k++, w += N) {                                                               \
        __m256 w0 = _mm256_loadu_ps(w);                                                                       \
        for (int r = 0; r < ROWS; r++) a0[r] = MADD(_mm256_broadcast_ss(A + r * lda + k), w0, a0[r]);         \
      }                                                                                                       \
      for (int r = 0; r < ROWS; r++) _mm256_storeu_ps(C + r * ldc + c, a0[r]);                                \
    }                                                                                                         \
  }                                                                                                           \
  ATTR static void dice_##SUFFIX(float *x, int64_t ld, int64_t N, const float *p) {                           \
    for (int r = 0; r < ROWS; r++)                                                                            \
      for (int64_t j = 0; j < N; j += 8)                                                                      \
        _mm256_storeu_ps(x + r * ld + j, dice8_##SUFFIX(_mm256_loadu_ps(x + r * ld + j), _mm256_loadu_ps(p + j), \
                                                        _mm256_loadu_ps(p + N + j), _mm256_loadu_ps(p + 2 * N + j), \
                                                        _mm256_loadu_ps(p + 3 * N + j)));                    \
  }
DIN_AVX2(plain, , MADD_PLAIN)
#if defined(__GNUC__)
DIN_AVX2(fused, __attribute__((target("avx2,fma"))), MADD_FUSED)
#endif
#endif

static void tile_c(const float *A, int64_t lda, int64_t K, const float *WT, int64_t N, float *C, int64_t ldc) {
  for (int r = 0; r < ROWS; r++)
    for (int64_t k = 0; k < K; k++) {
      float a = A[r * lda + k];
      const float *w = WT + k * N;
      float *out = C + r * ldc;
      for (int64_t c = 0; c < N; c++) out[c] += a * w[c];
    }
}

static void dice_c(float *x, int64_t ld, int64_t N, const float *p) {
  for (int r = 0; r < ROWS; r++)
    for (int64_t j = 0; j < N; j++) x[r * ld + j] = dice1(x[r * ld + j], p[j], p[N + j], p[2 * N + j], p[3 * N + j]);
}

typedef void (*tile_fn)(const float *, int64_t, int64_t, const float *, int64_t, float *, int64_t);
typedef void (*dice_fn)(float *, int64_t, int64_t, const float *);

/* Pre-softmax DIN scores out [B, U] of B queries against U keys. query_term [B, H0], key_term [U, H0]: the first
   layer's per-query (with its bias) and per-key terms; queries [B, E], keys [U, E]; layers hidden layers of widths
   widths[l] (multiples of 8, at most max_width), weights_t[0] = W_p^T [E, H0], weights_t[l] = W_l^T [H_{l-1}, H_l]
   and biases[l] [H_l] for l >= 1 (biases[0] unused), dice[l] [4, H_l] (inv, shift, alpha, 1 - alpha); score_w
   [H_last], score_b. Returns 0, or 1 when its buffers cannot be allocated. */
int muse_din_scores(const float *query_term, const float *key_term, const float *queries, const float *keys,
                    int64_t B, int64_t U, int64_t E, int64_t layers, const int64_t *widths,
                    const float *const *weights_t, const float *const *biases, const float *const *dice,
                    const float *score_w, float score_b, float *out) {
  int64_t width = E;
  for (int64_t l = 0; l < layers; l++) width = widths[l] > width ? widths[l] : width;
  float *buf = (float *)malloc(sizeof(float) * 3 * ROWS * width);
  if (!buf) return 1;
  float *prod = buf, *h = buf + ROWS * width, *g = buf + 2 * ROWS * width;
  tile_fn tile = tile_c;
  dice_fn activate = dice_c;
#if defined(__AVX2__)
  tile = tile_plain;
  activate = dice_plain;
#if defined(__GNUC__)
  if (__builtin_cpu_supports("fma")) {
    tile = tile_fused;
    activate = dice_fused;
  }
#endif
#endif
  int64_t H0 = widths[0], pairs = B * U;
  for (int64_t n0 = 0; n0 < pairs; n0 += ROWS) {
    for (int r = 0; r < ROWS; r++) {
      int64_t n = n0 + r < pairs ? n0 + r : pairs - 1;  /* the last tile repeats the last pair; its rows are dropped */
      int64_t b = n / U, u = n - b * U;
      const float *q = queries + b * E, *k = keys + u * E, *qt = query_term + b * H0, *kt = key_term + u * H0;
      for (int64_t e = 0; e < E; e++) prod[r * width + e] = q[e] * k[e];
      for (int64_t j = 0; j < H0; j++) h[r * width + j] = qt[j] + kt[j];
    }
    tile(prod, width, E, weights_t[0], H0, h, width);
    activate(h, width, H0, dice[0]);
    for (int64_t l = 1; l < layers; l++) {
      for (int r = 0; r < ROWS; r++) memcpy(g + r * width, biases[l], sizeof(float) * widths[l]);
      tile(h, width, widths[l - 1], weights_t[l], widths[l], g, width);
      activate(g, width, widths[l], dice[l]);
      float *swap = h; h = g; g = swap;
    }
    int64_t last = widths[layers - 1];
    for (int r = 0; r < ROWS && n0 + r < pairs; r++) out[n0 + r] = score_b + dot8(h + r * width, score_w, last);
  }
  free(buf);
  return 0;
}
"""

_P = ctypes.c_void_p
_SIGNATURES = {"muse_din_scores": (ctypes.c_int, [_P, _P, _P, _P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                                  ctypes.c_int64, _P, _P, _P, _P, _P, ctypes.c_float, _P])}
LIBRARY = cbuild.Library("muse_din", SOURCE, _SIGNATURES)  # LIBRARY.reason(): why it is not built here


def _pad_cols(x: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(x, (0, width - x.shape[-1])).contiguous() if x.shape[-1] != width else x.contiguous()


def _padded(n: int) -> int:
    return -(-n // 8) * 8


@dataclass(frozen=True)
class Prepared:
    """What the kernel reads of one ``DinAttention``, float32, widths padded to multiples of 8: the first layer's
    query and key weights (W_q + W_d, W_k - W_d) and bias, and the pointer arrays ``muse_din_scores`` takes."""

    w_query: torch.Tensor
    w_key: torch.Tensor
    bias: torch.Tensor
    widths: torch.Tensor
    tensors: Tuple[torch.Tensor, ...]  # kept alive: the arrays below point into them
    weights: ctypes.Array
    biases: ctypes.Array
    dice: ctypes.Array
    score_w: torch.Tensor
    score_b: float


def _pairs(din) -> Optional[list]:
    layers = list(din.mlp)
    pairs = [layers[i:i + 2] for i in range(0, len(layers), 2)]
    if not pairs or any(len(p) != 2 or not isinstance(p[1], Dice) or not p[1]._running() for p in pairs):
        return None
    return pairs


@torch.no_grad()
def prepare(din) -> Optional[Prepared]:
    """``din``'s ``Prepared`` (under inference mode kept until a parameter or statistic changes, ``tower.cached``;
    built on every call elsewhere), or None when its MLP is not Linear + Dice (eval statistics) throughout."""
    return cached(din, "_din_native", lambda: _prepare(din))


def _prepare(din) -> Optional[Prepared]:
    pairs = _pairs(din)
    if pairs is None:
        return None
    first = pairs[0][0]
    w_q, w_k, w_d, w_p = first.weight.float().chunk(4, dim=1)
    widths = [_padded(linear.out_features) for linear, _ in pairs]
    pad = widths[0] - first.out_features
    weights: List[torch.Tensor] = [_pad_cols(w_p.t(), widths[0])]
    biases: List[Optional[torch.Tensor]] = [None]
    for (linear, _), before, width in zip(pairs[1:], widths, widths[1:]):
        w_t = linear.weight.float().t()
        weights.append(_pad_cols(F.pad(w_t, (0, 0, 0, before - w_t.shape[0])), width))
        biases.append(_pad_cols(linear.bias.float(), width))
    dice = []
    for (_, act), width in zip(pairs, widths):
        params = act.eval_parameters().float()  # [4, H]: inv, shift, alpha, 1 - alpha
        extra = width - params.shape[1]
        if extra:  # a padded unit: Dice(0) = 0
            params = torch.cat([params, torch.tensor([[1.0], [0.0], [0.0], [1.0]]).expand(4, extra)], dim=1)
        dice.append(params.contiguous())
    array = ctypes.c_void_p * len(pairs)
    prepared = Prepared(
        w_query=F.pad(w_q + w_d, (0, 0, 0, pad)).contiguous(), w_key=F.pad(w_k - w_d, (0, 0, 0, pad)).contiguous(),
        bias=F.pad(first.bias.float(), (0, pad)).contiguous(), widths=torch.tensor(widths, dtype=torch.int64),
        tensors=tuple(weights + [b for b in biases if b is not None] + dice),
        weights=array(*[w.data_ptr() for w in weights]),
        biases=array(*[0 if b is None else b.data_ptr() for b in biases]), dice=array(*[d.data_ptr() for d in dice]),
        score_w=_pad_cols(din.score.weight.float().reshape(-1), widths[-1]), score_b=float(din.score.bias.float().item()))
    return prepared


@torch.no_grad()
def scores(din, query: torch.Tensor, keys: torch.Tensor) -> Optional[torch.Tensor]:
    """Pre-softmax scores float32 [B, U] of ``din`` (a ``DinAttention`` in eval mode) for queries [B, E] against
    keys [U, E]; None when the kernel is not built here or an activation is not Dice (or there is no hidden
    layer)."""
    function = LIBRARY.function("muse_din_scores")
    prepared = prepare(din) if function is not None else None
    if prepared is None:
        return None
    query, keys = query.to(torch.float32).contiguous(), keys.to(torch.float32).contiguous()
    (b, e), u = query.shape, keys.shape[0]
    out = torch.empty(b, u, dtype=torch.float32)
    if b == 0 or u == 0:
        return out
    query_term = F.linear(query, prepared.w_query, prepared.bias)
    key_term = keys @ prepared.w_key.t()
    status = function(query_term.data_ptr(), key_term.contiguous().data_ptr(), query.data_ptr(), keys.data_ptr(), b,
                      u, e, len(prepared.weights), prepared.widths.data_ptr(), prepared.weights, prepared.biases,
                      prepared.dice, prepared.score_w.data_ptr(), prepared.score_b, out.data_ptr())
    if status != 0:
        raise MemoryError("muse_din_scores: cannot allocate its buffers")
    return out
