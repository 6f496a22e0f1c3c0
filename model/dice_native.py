"""A native (C) kernel for eval Dice in place (``Dice.apply_``): x <- x (alpha + sigmoid(x inv + shift) (1 - alpha)).

Why: serving's DIN runs Dice over [1,000 candidates x 50 behaviors, 80] and [.., 40] activations per request; in
torch that is four passes (addcmul, sigmoid, addcmul, mul). Here it is one pass, 8 lanes at a time with AVX2, with
fused multiply-adds where the CPU has FMA (both variants compiled, one chosen at run time); ``muse bench kernels``
times it against the torch passes (docs/serving.md). The
formula: sigmoid(z) = 1 / (1 + exp(-z)) with exp from a Cody-Waite range reduction (n = round(y log2 e), r = y - n ln 2 in
two parts) and a degree-6 polynomial on r (Cephes' expf), scaled by 2**n through the exponent bits; exp's argument
is clamped to [-87, 88], so beyond |z| = 87 sigmoid is within 1e-38 of 0 or 1 rather than torch's value there
(which differs only for |x| above ~1e30). Its relative error is a few float32 ulps (tests compare it with torch's
eval Dice at 1e-6), so a probability computed through it differs from one through torch's sigmoid in the 7th
digit at most. Hosts without AVX2 run the same formula in plain C (``expf``). Built and loaded like the GSU
kernels (``model.gsu.cbuild``); ``dice_`` returns False where no C compiler is, and the caller runs the torch ops.
Its parameters come as one [4, H] tensor (``parameters``), built once per caller rather than per call.
"""

import ctypes

import torch

from model.gsu import cbuild

# Eval Dice of 8 lanes (exp, sigmoid, gate), pasted into this kernel and the DIN kernel (``model.din_native``);
# needs immintrin.h and __AVX2__. Written once over MADD(a, b, c) = a * b + c: plain AVX2 (a multiply, then an add)
# and, where the CPU has it, FMA (one fused operation, compiled for that target only and chosen at run time).
DICE8_C = r"""
#define MADD_PLAIN(a, b, c) _mm256_add_ps(_mm256_mul_ps((a), (b)), (c))
#define MADD_FUSED(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define DICE8(SUFFIX, ATTR, MADD)                                                                             \
  ATTR static inline __m256 exp8_##SUFFIX(__m256 y) {                                                         \
    y = _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));                       \
    __m256 n = _mm256_round_ps(_mm256_mul_ps(y, _mm256_set1_ps(1.44269504088896341f)),                        \
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);                                \
    __m256 r = MADD(n, _mm256_set1_ps(-0.693359375f), y);                                                     \
    r = MADD(n, _mm256_set1_ps(2.12194440e-4f), r);                                                           \
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);                                                              \
    p = MADD(p, r, _mm256_set1_ps(1.3981999507e-3f));                                                         \
    p = MADD(p, r, _mm256_set1_ps(8.3334519073e-3f));                                                         \
    p = MADD(p, r, _mm256_set1_ps(4.1665795894e-2f));                                                         \
    p = MADD(p, r, _mm256_set1_ps(1.6666665459e-1f));                                                         \
    p = MADD(p, r, _mm256_set1_ps(5.0000001201e-1f));                                                         \
    p = _mm256_add_ps(MADD(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));                                 \
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);       \
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));                                                          \
  }                                                                                                           \
  /* v (alpha + sigmoid(v inv + shift) (1 - alpha)) */                                                        \
  ATTR static inline __m256 dice8_##SUFFIX(__m256 v, __m256 inv, __m256 shift, __m256 alpha, __m256 oma) {    \
    const __m256 one = _mm256_set1_ps(1.0f);                                                                  \
    __m256 z = MADD(v, inv, shift);                                                                           \
    __m256 p = _mm256_div_ps(one, _mm256_add_ps(one, exp8_##SUFFIX(_mm256_sub_ps(_mm256_setzero_ps(), z)))); \
    return _mm256_mul_ps(v, MADD(p, oma, alpha));                                                             \
  }
DICE8(plain, , MADD_PLAIN)
#if defined(__GNUC__)
DICE8(fused, __attribute__((target("avx2,fma"))), MADD_FUSED)
#endif
"""

SOURCE = r"""
#include <stdint.h>
#include <math.h>
#if defined(__AVX2__)
#include <immintrin.h>
""" + DICE8_C + r"""
/* The Dice rows over ``dice8``, plain AVX2 and FMA. */
#define DICE_AVX2(SUFFIX, ATTR)                                                                               \
  ATTR static int64_t rows_##SUFFIX(float *row, int64_t width, const float *inv, const float *shift,          \
                                    const float *alpha, const float *one_minus_alpha) {                       \
    int64_t j = 0;                                                                                            \
    for (; j + 8 <= width; j += 8)                                                                            \
      _mm256_storeu_ps(row + j, dice8_##SUFFIX(_mm256_loadu_ps(row + j), _mm256_loadu_ps(inv + j),            \
                                               _mm256_loadu_ps(shift + j), _mm256_loadu_ps(alpha + j),        \
                                               _mm256_loadu_ps(one_minus_alpha + j)));                        \
    return j;                                                                                                 \
  }
DICE_AVX2(plain, )
#if defined(__GNUC__)
DICE_AVX2(fused, __attribute__((target("avx2,fma"))))
#endif
#endif

/* x [rows, width] (row stride ld) in place: x * (alpha + sigmoid(x * inv + shift) * (1 - alpha)), per column. */
void muse_dice_(float *x, int64_t rows, int64_t width, int64_t ld, const float *inv, const float *shift,
                const float *alpha, const float *one_minus_alpha) {
#if defined(__AVX2__) && defined(__GNUC__)
  int fused = __builtin_cpu_supports("fma");
#endif
  for (int64_t i = 0; i < rows; i++) {
    float *row = x + i * ld;
    int64_t j = 0;
#if defined(__AVX2__)
#if defined(__GNUC__)
    j = fused ? rows_fused(row, width, inv, shift, alpha, one_minus_alpha)
              : rows_plain(row, width, inv, shift, alpha, one_minus_alpha);
#else
    j = rows_plain(row, width, inv, shift, alpha, one_minus_alpha);
#endif
#endif
    for (; j < width; j++) {
      float z = row[j] * inv[j] + shift[j];
      float p = 1.0f / (1.0f + expf(-z));
      row[j] = row[j] * (alpha[j] + p * one_minus_alpha[j]);
    }
  }
}
"""

_SIGNATURES = {"muse_dice_": (None, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p])}
LIBRARY = cbuild.Library("muse_dice", SOURCE, _SIGNATURES)  # LIBRARY.reason(): why it is not built here


def parameters(inv: torch.Tensor, shift: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """float32 [4, H] contiguous rows inv, shift, alpha, 1 - alpha: what ``dice_`` reads (build once, reuse)."""
    return torch.stack([inv, shift, alpha, 1 - alpha]).detach().to(torch.float32).contiguous()


def available() -> bool:
    """Whether the kernel is built here (``LIBRARY.reason()`` says why not)."""
    return LIBRARY.function("muse_dice_") is not None


def dice_(x: torch.Tensor, params: torch.Tensor) -> bool:
    """Eval Dice of x float32 [n, H] (rows may be strided, columns contiguous) in place, with ``params`` [4, H] from
    ``parameters`` (inv = 1 / sqrt(running_var + eps), shift = -running_mean inv, alpha, 1 - alpha). False (x
    untouched) when the kernel is not available or x is not a float32 matrix with contiguous columns."""
    function = LIBRARY.function("muse_dice_")
    if function is None or x.dtype != torch.float32 or x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
        return False
    if params.dtype != torch.float32 or not params.is_contiguous() or tuple(params.shape) != (4, x.shape[1]):
        raise ValueError(f"params: expected contiguous float32 [4, {x.shape[1]}] (dice_native.parameters), "
                         f"got {params.dtype} {tuple(params.shape)}")
    row = params.stride(0) * params.element_size()
    base = params.data_ptr()
    function(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), base, base + row, base + 2 * row, base + 3 * row)
    return True
