"""C source shared by the model's native kernels (``model.din_native``, ``model.esu_native``), pasted into each
library's source.

``DOT8_C``: ``static inline float dot8(const float *x, const float *y, int64_t n)``, x . y over n floats, 8 lanes at a
time where the build has AVX2 (a short dependency chain instead of one add after another; the lanes are summed as
lo + hi, then pairs, then the last two), the rest (n % 8, or everything without AVX2) in order.
"""

DOT8_C = r"""
#include <stdint.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
static inline float dot8(const float *x, const float *y, int64_t n) {
  int64_t d = 0;
  float sum = 0.0f;
#if defined(__AVX2__)
  if (n >= 8) {
    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(y));
    for (d = 8; d + 8 <= n; d += 8) acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    sum = _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
#endif
  for (; d < n; d++) sum += x[d] * y[d];
  return sum;
}
"""
