// y[m, n] = sum_k x[m, k] * w[n, k] on the CPU, with every output computed by the same sequence
// of instructions whatever M, the tile it falls in, or the thread count: a row's bits never
// depend on its batch. Built at first use by native_linear.py with -march=native.
//
// x is fp32 [M, K]; w is bf16 or fp32 [N, K]; y is fp32 or bf16 [M, N]. Per output: one vector
// accumulator over k in fixed steps of VL (a masked load for the tail), fp32 FMAs (a bf16 weight
// is widened exactly), then one horizontal sum in a fixed order. A tile of MB x rows and NB w rows
// shares its loads; threads split n only, so no output is ever summed across threads.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define VL 16
#define MB 4
#define NB 4
typedef __m512 vec;
#define VZERO() _mm512_setzero_ps()
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VHSUM(v) _mm512_reduce_add_ps(v)
static inline __mmask16 tail_mask(long left) { return left >= VL ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1); }
static inline vec load_f32(const float *p, long left) {
    return left >= VL ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(tail_mask(left), p);
}
static inline vec load_bf16(const uint16_t *p, long left) {
    __m256i h = left >= VL ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16(tail_mask(left), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#define ISA 2
#elif defined(__AVX2__) && defined(__FMA__)
#define VL 8
#define MB 2
#define NB 4
typedef __m256 vec;
#define VZERO() _mm256_setzero_ps()
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#define VHSUM(v) hsum256(v)
static inline __m256i tail_mask(long left) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(left < VL ? left : VL)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vec load_f32(const float *p, long left) {
    return left >= VL ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail_mask(left));
}
static inline vec load_bf16(const uint16_t *p, long left) {
    __m128i h;
    if (left >= VL) {
        h = _mm_loadu_si128((const __m128i *)p);
    } else {
        uint16_t tmp[VL] = {0};
        memcpy(tmp, p, (size_t)left * 2);
        h = _mm_loadu_si128((const __m128i *)tmp);
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#define ISA 1
#else
#define ISA 0
#endif

#ifndef PF_DIST
#define PF_DIST 8192
#endif
#define M_CHUNK 64  // x rows per pass over a thread's w rows (a long prefill's x stays in L2)

// 0: no kernel on this CPU (callers keep torch's path); 1: AVX2 + FMA; 2: AVX-512.
int pdl_isa(void) { return ISA; }

static inline uint16_t to_bf16(float f) {  // round to nearest even, NaN to 0x7fc0, as torch does
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if ISA
// One (mb x nb) tile over all of k; mb and nb are constants at every call, so the loops unroll
// and the accumulators stay in registers.
#define TILE_FN(name, WT, LOADW)                                                               \
    static inline __attribute__((always_inline)) void name(                                   \
        const float *x, const WT *w, void *y, int y_bf16, long N, long K, long m0, long n0,    \
        const int mb, const int nb) {                                                         \
        vec acc[MB][NB];                                                                      \
        _Pragma("GCC unroll 4") for (int i = 0; i < mb; i++)                                  \
            _Pragma("GCC unroll 4") for (int j = 0; j < nb; j++) acc[i][j] = VZERO();         \
        long k = 0;                                                                           \
        for (; k + VL <= K; k += VL) {                                                        \
            vec wv[NB];                                                                       \
            _Pragma("GCC unroll 4") for (int j = 0; j < nb; j++)                              \
                _mm_prefetch((const char *)(w + (n0 + j) * K + k) + PF_DIST, _MM_HINT_T0);    \
            _Pragma("GCC unroll 4") for (int j = 0; j < nb; j++) wv[j] = LOADW(w + (n0 + j) * K + k, VL); \
            _Pragma("GCC unroll 4") for (int i = 0; i < mb; i++) {                            \
                vec xv = load_f32(x + (m0 + i) * K + k, VL);                                  \
                _Pragma("GCC unroll 4") for (int j = 0; j < nb; j++) acc[i][j] = VFMA(xv, wv[j], acc[i][j]); \
            }                                                                                 \
        }                                                                                     \
        if (k < K) { /* the tail, zero-filled: the same step for every output */              \
            vec wv[NB];                                                                       \
            _Pragma("GCC unroll 4") for (int j = 0; j < nb; j++) wv[j] = LOADW(w + (n0 + j) * K + k, K - k); \
            _Pragma("GCC unroll 4") for (int i = 0; i < mb; i++) {                            \
                vec xv = load_f32(x + (m0 + i) * K + k, K - k);                               \
                _Pragma("GCC unroll 4") for (int j = 0; j < nb; j++) acc[i][j] = VFMA(xv, wv[j], acc[i][j]); \
            }                                                                                 \
        }                                                                                     \
        _Pragma("GCC unroll 4") for (int i = 0; i < mb; i++)                                  \
            _Pragma("GCC unroll 4") for (int j = 0; j < nb; j++) {                            \
                float s = VHSUM(acc[i][j]);                                                   \
                if (y_bf16) ((uint16_t *)y)[(m0 + i) * N + n0 + j] = to_bf16(s);              \
                else ((float *)y)[(m0 + i) * N + n0 + j] = s;                                 \
            }                                                                                 \
    }

TILE_FN(tile_bf16, uint16_t, load_bf16)
TILE_FN(tile_f32, float, load_f32)

// Rows [lo, hi) of w against all of x; every call below has constant (mb, nb).
#define RANGE_FN(name, WT, TILE)                                                               \
    static void name(const float *x, const WT *w, void *y, int y_bf16, long M, long N, long K, \
                     long lo, long hi) {                                                      \
        for (long mc = 0; mc < M; mc += M_CHUNK) {                                            \
            long mend = mc + M_CHUNK < M ? mc + M_CHUNK : M;                                  \
            long n0 = lo;                                                                     \
            for (; n0 + NB <= hi; n0 += NB) {                                                 \
                long m0 = mc;                                                                 \
                for (; m0 + MB <= mend; m0 += MB) TILE(x, w, y, y_bf16, N, K, m0, n0, MB, NB); \
                for (; m0 < mend; m0++) TILE(x, w, y, y_bf16, N, K, m0, n0, 1, NB);           \
            }                                                                                 \
            for (; n0 < hi; n0++)                                                             \
                for (long m0 = mc; m0 < mend; m0++) TILE(x, w, y, y_bf16, N, K, m0, n0, 1, 1); \
        }                                                                                     \
    }

RANGE_FN(range_bf16, uint16_t, tile_bf16)
RANGE_FN(range_f32, float, tile_f32)

// Thread t of nt takes whole NB-row tiles of n, as evenly as they split.
static inline void thread_range(long n, int t, int nt, long *lo, long *hi) {
    long tiles = (n + NB - 1) / NB;
    long per = tiles / nt, extra = tiles % nt;
    long start = t * per + (t < extra ? t : extra);
    long end = start + per + (t < extra ? 1 : 0);
    *lo = start * NB < n ? start * NB : n;
    *hi = end * NB < n ? end * NB : n;
}

// w_bf16: w is bf16 (else fp32); y_bf16: y is written as bf16 (else fp32).
void pdl_linear(const float *x, const void *w, void *y, long M, long N, long K, int w_bf16, int y_bf16,
                int nt) {
    if (nt < 1) nt = 1;
#pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int t = 0; t < nt; t++) {
        long lo, hi;
        thread_range(N, t, nt, &lo, &hi);
        if (w_bf16) range_bf16(x, (const uint16_t *)w, y, y_bf16, M, N, K, lo, hi);
        else range_f32(x, (const float *)w, y, y_bf16, M, N, K, lo, hi);
    }
}
#else
void pdl_linear(const float *x, const void *w, void *y, long M, long N, long K, int w_bf16, int y_bf16,
                int nt) {
    (void)x; (void)w; (void)y; (void)M; (void)N; (void)K; (void)w_bf16; (void)y_bf16; (void)nt;
}
#endif
