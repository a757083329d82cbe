// y[m, n] = sum_k x[m, k] * w[n, k] on the CPU, with every output computed by the same sequence
// of instructions whatever M, the tile it falls in, or the thread count: a row's bits never
// depend on its batch. Built at first use by native_linear.py with -march=native.
//
// w is packed once into panels of PW output columns, [ceil(N / PW)][K][PW] (bf16 or fp32, zero
// columns past N), so a panel streams contiguously. Per output: one fp32 lane accumulating
// x[m, k] * w[n, k] over each block of KB k in order (FMA; a bf16 weight is widened exactly), each
// block's sum added to a running total. A tile is MB x rows by one panel; threads split panels
// only, so no sum is ever split.
#include "native_simd.h"

int pdl_prof_on;
double pdl_prof_s[3];

// Copy the counters to out[3] (if not NULL), reset them, and turn profiling on or off.
void pdl_profile(int on, double *out) {
    if (out) memcpy(out, pdl_prof_s, sizeof pdl_prof_s);
    memset(pdl_prof_s, 0, sizeof pdl_prof_s);
    pdl_prof_on = on;
}

// 0: no kernel on this CPU (callers keep torch's path); 1: AVX2 + FMA; 2: AVX-512.
int pdl_isa(void) { return ISA; }
int pdl_panel_width(void) { return PW; }

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
#define PANEL_FN(name, XT, WT, TILE)                                                            \
    static void name(const XT *x, const WT *w, void *y, int y_bf16, long M, long N, long K, long p) { \
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

PANEL_FN(panel_bf16, float, uint16_t, tile_bf16)
PANEL_FN(panel_f32, float, float, tile_f32)

#if defined(__AVX512BF16__)
// bf16 weights on a CPU with VDPBF16PS (2.5x an fp32 FMA's flops here): panels of k pairs,
// [ceil(N / PW)][ceil(K / 2)][PW][2], against x rounded to bf16 pairs (exact: every x the model
// passes holds bf16 values). Per output, per block of KB k: one fp32 lane accumulating pair dot
// products in order, the block's sum added to a running total, as the FMA tile does.
#define PAIRS 1
static inline __attribute__((always_inline)) void tile_dp(const uint32_t *x, const uint32_t *panel, void *y,
                                                          int y_bf16, long N, long K2, long m0, long n0,
                                                          long cols, const int mb) {
    __m512 acc[MB][4], total[MB][4];
    _Pragma("GCC unroll 8") for (int i = 0; i < mb; i++)
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) total[i][j] = VZERO();
    for (long kb = 0; kb < K2; kb += KB / 2) {
        long kend = kb + KB / 2 < K2 ? kb + KB / 2 : K2;
        _Pragma("GCC unroll 8") for (int i = 0; i < mb; i++)
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) acc[i][j] = VZERO();
        for (long k = kb; k < kend; k++) {
            const uint32_t *row = panel + k * PW;
            // no software prefetch here: with one, 576 x 3072 read at 23-26 GB/s, without at 28
            __m512bh w0 = (__m512bh)_mm512_loadu_si512(row), w1 = (__m512bh)_mm512_loadu_si512(row + 16);
            __m512bh w2 = (__m512bh)_mm512_loadu_si512(row + 32), w3 = (__m512bh)_mm512_loadu_si512(row + 48);
            _Pragma("GCC unroll 8") for (int i = 0; i < mb; i++) {
                __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x[(m0 + i) * K2 + k]);
                acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xb, w0);
                acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xb, w1);
                acc[i][2] = _mm512_dpbf16_ps(acc[i][2], xb, w2);
                acc[i][3] = _mm512_dpbf16_ps(acc[i][3], xb, w3);
            }
        }
        _Pragma("GCC unroll 8") for (int i = 0; i < mb; i++)
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) total[i][j] = VADD(total[i][j], acc[i][j]);
    }
    _Pragma("GCC unroll 8") for (int i = 0; i < mb; i++) store_row(y, y_bf16, N, m0 + i, n0, cols, total[i]);
}
PANEL_FN(panel_dp, uint32_t, uint32_t, tile_dp)
#else
#define PAIRS 0
#endif

// x fp32 [M, K]; w packed [ceil(N / PW)][K][PW], bf16 (w_bf16) or fp32; y [M, N] bf16 (y_bf16) or
// fp32. Threads take whole panels.
static void linear_impl(const float *x, const void *w, void *y, long M, long N, long K, int w_bf16, int y_bf16,
                        int nt) {
    long panels = (N + PW - 1) / PW;
    if (nt < 1) nt = 1;
#if PAIRS
    if (w_bf16) {
        long K2 = (K + 1) / 2;
        uint32_t *xp = malloc((size_t)(M * K2 + 1) * sizeof(uint32_t));
        if (!xp) return;  // (a few KB: not expected)
        uint16_t *xh = (uint16_t *)xp;
        for (long m = 0; m < M; m++) {
            for (long k = 0; k < K; k++) xh[m * 2 * K2 + k] = to_bf16(x[m * K + k]);
            if (K % 2) xh[m * 2 * K2 + K] = 0;
        }
#pragma omp parallel for num_threads(nt) schedule(static)
        for (long p = 0; p < panels; p++) panel_dp(xp, (const uint32_t *)w, y, y_bf16, M, N, K2, p);
        free(xp);
        return;
    }
#endif
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long p = 0; p < panels; p++) {
        if (w_bf16) panel_bf16(x, (const uint16_t *)w, y, y_bf16, M, N, K, p);
        else panel_f32(x, (const float *)w, y, y_bf16, M, N, K, p);
    }
}

void pdl_linear(const float *x, const void *w, void *y, long M, long N, long K, int w_bf16, int y_bf16,
                int nt) {
    TIMED(0, linear_impl(x, w, y, M, N, K, w_bf16, y_bf16, nt));
}

// 1: bf16 weights are packed as k pairs (the VDPBF16PS tile), [ceil(N / PW)][ceil(K / 2)][PW][2].
int pdl_bf16_pairs(void) { return PAIRS; }
#else
void pdl_linear(const float *x, const void *w, void *y, long M, long N, long K, int w_bf16, int y_bf16,
                int nt) {
    (void)x; (void)w; (void)y; (void)M; (void)N; (void)K; (void)w_bf16; (void)y_bf16; (void)nt;
}
int pdl_bf16_pairs(void) { return 0; }
#endif
