// What native_linear.c and native_decode.c share: the ISA (AVX-512, AVX2 + FMA, or none) and
// its vector macros, bf16 rounding, profiling counters, and the linear both call.
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__AVX512F__)
#define VL 16
#define MB 6
typedef __m512 vec;
#define VZERO() _mm512_setzero_ps()
#define VSET1(f) _mm512_set1_ps(f)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define VHSUM(v) _mm512_reduce_add_ps(v)
#define VLOADF(p) _mm512_loadu_ps(p)
#define VSTOREF(p, v) _mm512_storeu_ps(p, v)
static inline vec load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#define ISA 2
#elif defined(__AVX2__) && defined(__FMA__)
#define VL 8
#define MB 2
typedef __m256 vec;
#define VZERO() _mm256_setzero_ps()
#define VSET1(f) _mm256_set1_ps(f)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VMUL(a, b) _mm256_mul_ps(a, b)
static inline float VHSUM(__m256 v) {  // a fixed order of adds
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 sh = _mm_movehdup_ps(lo), sum = _mm_add_ps(lo, sh);
    return _mm_cvtss_f32(_mm_add_ss(sum, _mm_movehl_ps(sh, sum)));
}
#define VLOADF(p) _mm256_loadu_ps(p)
#define VSTOREF(p, v) _mm256_storeu_ps(p, v)
static inline vec load_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#define ISA 1
#else
#define VL 8
#define ISA 0
#endif

#define PW (4 * VL)  // panel width: 4 vectors of output columns
#define KB 64  // k per block: each block's sum is added to the running total (bounds the error)
#define PF_DIST 2048  // bytes ahead in the panel to prefetch (a panel row is 64-128 bytes)

static inline uint16_t to_bf16(float f) {  // round to nearest even, NaN to 0x7fc0, as torch does
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // a select, not a branch: loops vectorise
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : r);
}

// Profiling (benchmarks/native_linear.py --profile): seconds in pdl_linear, in decode attention
// and in whole decode layers since pdl_profile last reset them; off by default (no clock reads).
extern int pdl_prof_on;
extern double pdl_prof_s[3];
static inline double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}
#define TIMED(slot, stmt)                                   \
    do {                                                    \
        double t0_ = pdl_prof_on ? now_s() : 0;             \
        stmt;                                               \
        if (pdl_prof_on) pdl_prof_s[slot] += now_s() - t0_; \
    } while (0)

void pdl_linear(const float *x, const void *w, void *y, long M, long N, long K, int w_bf16, int y_bf16, int nt);
