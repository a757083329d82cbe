// y[m, n] = sum_k x[m, k] * w[n, k] on the CPU, with every output computed by the same sequence
// of instructions whatever M, the tile it falls in, or the thread count: a row's bits never
// depend on its batch. Built at first use by native_linear.py with -march=native.
//
// w is packed once into panels of PW output columns, [ceil(N / PW)][K][PW] (bf16 or fp32, zero
// columns past N), so a panel streams contiguously. Per output: one fp32 lane accumulating
// x[m, k] * w[n, k] over each block of KB k in order (FMA; a bf16 weight is widened exactly), each
// block's sum added to a running total. A tile is MB x rows by one panel; threads split panels
// only, so no sum is ever split.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define VL 16
#define MB 6
typedef __m512 vec;
#define VZERO() _mm512_setzero_ps()
#define VSET1(f) _mm512_set1_ps(f)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VADD(a, b) _mm512_add_ps(a, b)
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

// 0: no kernel on this CPU (callers keep torch's path); 1: AVX2 + FMA; 2: AVX-512.
int pdl_isa(void) { return ISA; }
int pdl_panel_width(void) { return PW; }

static inline uint16_t to_bf16(float f) {  // round to nearest even, NaN to 0x7fc0, as torch does
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if ISA
// Write one tile row's PW sums to y (the first `cols` of them: the last panel may be partial).
static inline void store_row(void *y, int y_bf16, long N, long m, long n0, long cols, const vec *acc) {
    float buf[PW];
    for (int j = 0; j < 4; j++) VSTOREF(buf + j * VL, acc[j]);
    if (y_bf16) {
        uint16_t *out = (uint16_t *)y + m * N + n0;
        for (long c = 0; c < cols; c++) out[c] = to_bf16(buf[c]);
    } else {
        memcpy((float *)y + m * N + n0, buf, (size_t)cols * sizeof(float));
    }
}

// One tile: rows [m0, m0 + mb) of x against panel p; mb is a constant at every call, so the loops
// unroll and the 4 * mb accumulators stay in registers.
#define TILE_FN(name, WT, LOADW)                                                                \
    static inline __attribute__((always_inline)) void name(                                    \
        const float *x, const WT *panel, void *y, int y_bf16, long N, long K, long m0, long n0, \
        long cols, const int mb) {                                                             \
        vec acc[MB][4], total[MB][4];                                                          \
        _Pragma("GCC unroll 8") for (int i = 0; i < mb; i++)                                   \
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) total[i][j] = VZERO();         \
        for (long kb = 0; kb < K; kb += KB) {                                                  \
            long kend = kb + KB < K ? kb + KB : K;                                             \
            _Pragma("GCC unroll 8") for (int i = 0; i < mb; i++)                               \
                _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) acc[i][j] = VZERO();       \
            for (long k = kb; k < kend; k++) {                                                 \
                const WT *row = panel + k * PW;                                                \
                _mm_prefetch((const char *)row + PF_DIST, _MM_HINT_T0);                        \
                vec w0 = LOADW(row), w1 = LOADW(row + VL), w2 = LOADW(row + 2 * VL), w3 = LOADW(row + 3 * VL); \
                _Pragma("GCC unroll 8") for (int i = 0; i < mb; i++) {                         \
                    vec xb = VSET1(x[(m0 + i) * K + k]);                                       \
                    acc[i][0] = VFMA(xb, w0, acc[i][0]);                                       \
                    acc[i][1] = VFMA(xb, w1, acc[i][1]);                                       \
                    acc[i][2] = VFMA(xb, w2, acc[i][2]);                                       \
                    acc[i][3] = VFMA(xb, w3, acc[i][3]);                                       \
                }                                                                              \
            }                                                                                  \
            _Pragma("GCC unroll 8") for (int i = 0; i < mb; i++)                               \
                _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) total[i][j] = VADD(total[i][j], acc[i][j]); \
        }                                                                                      \
        _Pragma("GCC unroll 8") for (int i = 0; i < mb; i++)                                   \
            store_row(y, y_bf16, N, m0 + i, n0, cols, total[i]);                               \
    }

TILE_FN(tile_bf16, uint16_t, load_bf16)
TILE_FN(tile_f32, float, VLOADF)

// All rows of x against panel p: full MB-row tiles, then one tile of the rest.
#define PANEL_FN(name, WT, TILE)                                                                \
    static void name(const float *x, const WT *w, void *y, int y_bf16, long M, long N, long K, long p) { \
        const WT *panel = w + p * K * PW;                                                      \
        long n0 = p * PW, cols = N - n0 < PW ? N - n0 : PW;                                    \
        long m0 = 0;                                                                           \
        for (; m0 + MB <= M; m0 += MB) TILE(x, panel, y, y_bf16, N, K, m0, n0, cols, MB);      \
        switch (M - m0) {                                                                      \
        case 1: TILE(x, panel, y, y_bf16, N, K, m0, n0, cols, 1); break;                       \
        case 2: TILE(x, panel, y, y_bf16, N, K, m0, n0, cols, 2); break;                       \
        case 3: TILE(x, panel, y, y_bf16, N, K, m0, n0, cols, (MB > 3 ? 3 : 1)); break;        \
        case 4: TILE(x, panel, y, y_bf16, N, K, m0, n0, cols, (MB > 4 ? 4 : 1)); break;        \
        case 5: TILE(x, panel, y, y_bf16, N, K, m0, n0, cols, (MB > 5 ? 5 : 1)); break;        \
        default: break;                                                                        \
        }                                                                                      \
    }

PANEL_FN(panel_bf16, uint16_t, tile_bf16)
PANEL_FN(panel_f32, float, tile_f32)

// x fp32 [M, K]; w packed [ceil(N / PW)][K][PW], bf16 (w_bf16) or fp32; y [M, N] bf16 (y_bf16) or
// fp32. Threads take whole panels.
void pdl_linear(const float *x, const void *w, void *y, long M, long N, long K, int w_bf16, int y_bf16,
                int nt) {
    long panels = (N + PW - 1) / PW;
    if (nt < 1) nt = 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long p = 0; p < panels; p++) {
        if (w_bf16) panel_bf16(x, (const uint16_t *)w, y, y_bf16, M, N, K, p);
        else panel_f32(x, (const float *)w, y, y_bf16, M, N, K, p);
    }
}
#else
void pdl_linear(const float *x, const void *w, void *y, long M, long N, long K, int w_bf16, int y_bf16,
                int nt) {
    (void)x; (void)w; (void)y; (void)M; (void)N; (void)K; (void)w_bf16; (void)y_bf16; (void)nt;
}
#endif
