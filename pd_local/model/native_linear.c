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

// Profiling (benchmarks/native_linear.py --profile): seconds in pdl_linear, in decode attention
// and in whole decode layers since pdl_profile last reset them; off by default (no clock reads).
static int prof_on;
static double prof_s[3];
static inline double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}
#define TIMED(slot, stmt)                               \
    do {                                                \
        double t0_ = prof_on ? now_s() : 0;             \
        stmt;                                           \
        if (prof_on) prof_s[slot] += now_s() - t0_;     \
    } while (0)

// Copy the counters to out[3] (if not NULL), reset them, and turn profiling on or off.
void pdl_profile(int on, double *out) {
    if (out) memcpy(out, prof_s, sizeof prof_s);
    memset(prof_s, 0, sizeof prof_s);
    prof_on = on;
}

// 0: no kernel on this CPU (callers keep torch's path); 1: AVX2 + FMA; 2: AVX-512.
int pdl_isa(void) { return ISA; }
int pdl_panel_width(void) { return PW; }

static inline uint16_t to_bf16(float f) {  // round to nearest even, NaN to 0x7fc0, as torch does
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // a select, not a branch: loops vectorise
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : r);
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

// ---- A whole decoder layer for decode rows (one query token per sequence) ------------------
// x [M, hidden] is updated in place: x += attn(norm1(x)); x += mlp(norm2(x)). Activations are
// rounded to the model dtype where torch's ops would round them (each op's output), while sums
// run in fp32, so a bf16 layer stays close to the torch path; every row is computed alone, by
// the same instructions whatever M or the thread count.
typedef struct {
    long hidden, heads, kv_heads, head_dim, inter, block_size;
    float eps, scale;
    int bf16;    // activations, norm weights, cos / sin and the KV cache in bf16 (else fp32)
    int w_bf16;  // the panels in bf16 (else fp32)
    const void *ln1, *ln2;                 // [hidden]
    const void *qkv, *o, *gate_up, *down;  // panels of [q | k | v], o, [gate | up], down
    void *k_cache, *v_cache;               // [slots, kv_heads, head_dim]
} pdl_layer;

#define CH 64  // keys per softmax chunk; chunks start at multiples of CH from position 0
#define MAXG 16  // query heads per KV head, at most
#define MAXD 256  // head_dim, at most (a multiple of 16)

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline float ld(const void *p, long i, int bf16) {
    return bf16 ? from_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void st(void *p, long i, float f, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = to_bf16(f);
    else ((float *)p)[i] = f;
}
static inline float rnd(float f, int bf16) { return bf16 ? from_bf16(to_bf16(f)) : f; }

// exp(x) = 2^n e^r, |r| <= ln2 / 2, degree-6 polynomial: ~1e-7 relative; x clamped to [-87, 88].
static inline float pdl_exp(float x) {
    x = fminf(fmaxf(x, -87.0f), 88.0f);
    int n = (int)(x * 1.44269504f + copysignf(0.5f, x));
    float r = x - (float)n * 0.693145752f - (float)n * 1.42860677e-6f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    uint32_t b = (uint32_t)(n + 127) << 23;
    float scale;
    memcpy(&scale, &b, 4);
    return p * scale;
}

long pdl_layer_scratch(const pdl_layer *L, long M) {  // floats of scratch one call needs
    long qkv = (L->heads + 2 * L->kv_heads) * L->head_dim, q = L->heads * L->head_dim;
    return M * (3 * L->hidden + qkv + 2 * q + 3 * L->inter);
}

// out[m] = w * norm(x[m]), rounded as RMSNorm's ops round (fp32 values of the model dtype).
static void rmsnorm_rows(const void *x, const void *w, float *out, long M, long H, float eps, int bf16, int nt) {
#pragma omp parallel for num_threads(nt) if (M > 1) schedule(static)
    for (long m = 0; m < M; m++) {
        double ss = 0;
        for (long k = 0; k < H; k++) {
            float v = ld(x, m * H + k, bf16);
            ss += (double)v * v;
        }
        float r = 1.0f / sqrtf((float)(ss / H) + eps);
        for (long k = 0; k < H; k++)
            out[m * H + k] = rnd(ld(w, k, bf16) * rnd(ld(x, m * H + k, bf16) * r, bf16), bf16);
    }
}

#define LOADX(p, bf16) ((bf16) ? load_bf16((const uint16_t *)(p)) : VLOADF((const float *)(p)))

// Row m, KV head g: its G query heads against the row's context, chunk by chunk (online softmax);
// vectors along head_dim. `bf16` is a constant at each call, so the loads specialise.
static inline __attribute__((always_inline)) void attend_t(const pdl_layer *L, const float *q, float *out,
                                                           const long *tables, long ctx, long g, const int bf16) {
    const long D = L->head_dim, KV = L->kv_heads, G = L->heads / KV, bs = L->block_size, nv = D / VL;
    const long row_bytes = D * (bf16 ? 2 : 4);
    const int shift = (bs & (bs - 1)) == 0 ? __builtin_ctzl((unsigned long)bs) : -1;  // no division per key
    vec acc[MAXG][MAXD / VL];
    float mx[MAXG], sum[MAXG], s[MAXG][CH];
    for (long i = 0; i < G; i++) {
        mx[i] = -87.0f;  // below any score's exp range: the first chunk's max replaces it
        sum[i] = 0;
        for (long v = 0; v < nv; v++) acc[i][v] = VZERO();
    }
    for (long c0 = 0; c0 < ctx; c0 += CH) {
        long n = ctx - c0 < CH ? ctx - c0 : CH;
        long off[CH];  // the chunk's K/V rows, as byte offsets into the caches
        for (long p = 0; p < n; p++) {
            long pos = c0 + p;
            long slot = shift >= 0 ? (tables[pos >> shift] << shift) + (pos & (bs - 1)) : tables[pos / bs] * bs + pos % bs;
            off[p] = (slot * KV + g) * row_bytes;
        }
        for (long p = 0; p < n; p++) {
            const char *kp = (const char *)L->k_cache + off[p];
            // V rows are read after this chunk's softmax: ask for them now (they missed cache)
            for (long b = 0; b < row_bytes; b += 64) _mm_prefetch((const char *)L->v_cache + off[p] + b, _MM_HINT_T0);
            if (p + 4 < n)
                for (long b = 0; b < row_bytes; b += 64) _mm_prefetch((const char *)L->k_cache + off[p + 4] + b, _MM_HINT_T0);
            vec kv[MAXD / VL];
            for (long v = 0; v < nv; v++) kv[v] = LOADX(kp + v * VL * (bf16 ? 2 : 4), bf16);
            for (long i = 0; i < G; i++) {
                vec t = VZERO();
                for (long v = 0; v < nv; v++) t = VFMA(VLOADF(q + (g * G + i) * D + v * VL), kv[v], t);
                s[i][p] = VHSUM(t) * L->scale;
            }
        }
        for (long i = 0; i < G; i++) {
            float cm = mx[i];
            for (long p = 0; p < n; p++) cm = s[i][p] > cm ? s[i][p] : cm;
            float alpha = pdl_exp(mx[i] - cm);
            sum[i] *= alpha;
            for (long v = 0; v < nv; v++) acc[i][v] = VMUL(acc[i][v], VSET1(alpha));
            for (long p = 0; p < n; p++) {
                s[i][p] = pdl_exp(s[i][p] - cm);
                sum[i] += s[i][p];
            }
            mx[i] = cm;
        }
        for (long p = 0; p < n; p++) {
            const char *vp = (const char *)L->v_cache + off[p];
            for (long v = 0; v < nv; v++) {
                vec vv = LOADX(vp + v * VL * (bf16 ? 2 : 4), bf16);
                for (long i = 0; i < G; i++) acc[i][v] = VFMA(VSET1(s[i][p]), vv, acc[i][v]);
            }
        }
    }
    for (long i = 0; i < G; i++) {
        float buf[VL];
        for (long v = 0; v < nv; v++) {
            VSTOREF(buf, acc[i][v]);
            for (int l = 0; l < VL; l++) out[(g * G + i) * D + v * VL + l] = rnd(buf[l] / sum[i], bf16);
        }
    }
}

static void attend(const pdl_layer *L, const float *q, float *out, const long *tables, long ctx, long g) {
    if (L->bf16) attend_t(L, q, out, tables, ctx, g, 1);
    else attend_t(L, q, out, tables, ctx, g, 0);
}

// x[m] += y[m] rounded as torch's add of two model-dtype tensors, rows in parallel; `bf16` is a
// constant at each call, so the loop specialises (and vectorises).
static inline __attribute__((always_inline)) void residual_t(void *x, const float *y, long M, long H, int nt,
                                                             const int bf16) {
#pragma omp parallel for num_threads(nt) if (M > 1) schedule(static)
    for (long m = 0; m < M; m++)
        for (long k = m * H; k < (m + 1) * H; k++) st(x, k, ld(x, k, bf16) + rnd(y[k], bf16), bf16);
}
static void residual_rows(void *x, const float *y, long M, long H, int bf16, int nt) {
    if (bf16) residual_t(x, y, M, H, nt, 1);
    else residual_t(x, y, M, H, nt, 0);
}

// a[m] = silu(gate) * up from gu[m] = [gate | up], rounded as torch's two ops round; one function
// per dtype so the loop has no branch (and vectorises).
#define SILU_FN(name, BF16)                                                                    \
    static void name(const float *gu, float *a, long M, long I, int nt) {                     \
        _Pragma("omp parallel for num_threads(nt) if (M > 1) schedule(static)")               \
        for (long m = 0; m < M; m++)                                                          \
            for (long j = 0; j < I; j++) {                                                    \
                float gt = rnd(gu[m * 2 * I + j], BF16), up = rnd(gu[m * 2 * I + I + j], BF16); \
                a[m * I + j] = rnd(rnd(gt / (1.0f + pdl_exp(-gt)), BF16) * up, BF16);         \
            }                                                                                 \
    }
SILU_FN(silu_bf16, 1)
SILU_FN(silu_f32, 0)

// x [M, hidden] (model dtype) in place; cos, sin [M, head_dim] (sin's first half negated, as
// RotaryEmbedding.cos_sin gives it); slots [M]; tables [M, W] block ids; ctx [M] context lengths
// counting this token; scratch: pdl_layer_scratch(L, M) floats.
static void decode_layer(const pdl_layer *L, void *x, const void *cos, const void *sin, const long *slots,
                         const long *tables, long W, const long *ctx, long M, float *scratch, int nt) {
    const long H = L->hidden, D = L->head_dim, NQ = L->heads, KV = L->kv_heads, I = L->inter;
    const long NQKV = (NQ + 2 * KV) * D, half = D / 2;
    const int bf16 = L->bf16;
    float *h = scratch, *y1 = h + M * H, *q = y1 + M * NQKV, *att = q + M * NQ * D;
    float *y2 = att + M * NQ * D, *y3 = y2 + M * H, *a = y3 + M * 2 * I;
    rmsnorm_rows(x, L->ln1, h, M, H, L->eps, bf16, nt);
    pdl_linear(h, L->qkv, y1, M, NQKV, H, L->w_bf16, 0, nt);
#pragma omp parallel for num_threads(nt) if (M > 1) schedule(static)
    for (long m = 0; m < M; m++) {  // rope on q and k (x * cos + roll(x) * sin), K and V to the cache
        const float *row = y1 + m * NQKV;
        for (long hh = 0; hh < NQ + KV; hh++) {
            const float *src = row + hh * D;
            float roped[MAXD];
            for (long j = 0; j < D; j++) {
                float xj = rnd(src[j], bf16), xr = rnd(src[(j + half) % D], bf16);
                roped[j] = rnd(rnd(xj * ld(cos, m * D + j, bf16), bf16) + rnd(xr * ld(sin, m * D + j, bf16), bf16), bf16);
            }
            if (hh < NQ) memcpy(q + (m * NQ + hh) * D, roped, D * sizeof(float));
            else for (long j = 0; j < D; j++) st(L->k_cache, (slots[m] * KV + hh - NQ) * D + j, roped[j], bf16);
        }
        for (long j = 0; j < KV * D; j++) st(L->v_cache, slots[m] * KV * D + j, row[(NQ + KV) * D + j], bf16);
    }
    double t0 = prof_on ? now_s() : 0;
#pragma omp parallel for num_threads(nt) if (M * KV > 1) schedule(static)
    for (long mg = 0; mg < M * KV; mg++) {
        long m = mg / KV;
        attend(L, q + m * NQ * D, att + m * NQ * D, tables + m * W, ctx[m], mg % KV);
    }
    if (prof_on) prof_s[1] += now_s() - t0;
    pdl_linear(att, L->o, y2, M, H, NQ * D, L->w_bf16, 0, nt);
    residual_rows(x, y2, M, H, bf16, nt);
    rmsnorm_rows(x, L->ln2, h, M, H, L->eps, bf16, nt);
    pdl_linear(h, L->gate_up, y3, M, 2 * I, H, L->w_bf16, 0, nt);
    if (bf16) silu_bf16(y3, a, M, I, nt);
    else silu_f32(y3, a, M, I, nt);
    pdl_linear(a, L->down, y2, M, H, I, L->w_bf16, 0, nt);
    residual_rows(x, y2, M, H, bf16, nt);
}

void pdl_decode_layer(const pdl_layer *L, void *x, const void *cos, const void *sin, const long *slots,
                      const long *tables, long W, const long *ctx, long M, float *scratch, int nt) {
    TIMED(2, decode_layer(L, x, cos, sin, slots, tables, W, ctx, M, scratch, nt));
}
#else
void pdl_linear(const float *x, const void *w, void *y, long M, long N, long K, int w_bf16, int y_bf16,
                int nt) {
    (void)x; (void)w; (void)y; (void)M; (void)N; (void)K; (void)w_bf16; (void)y_bf16; (void)nt;
}
int pdl_bf16_pairs(void) { return 0; }
long pdl_layer_scratch(const void *L, long M) { (void)L; (void)M; return 0; }
void pdl_decode_layer(const void *L, void *x, const void *cos, const void *sin, const long *slots,
                      const long *tables, long W, const long *ctx, long M, float *scratch, int nt) {
    (void)L; (void)x; (void)cos; (void)sin; (void)slots; (void)tables; (void)W; (void)ctx; (void)M;
    (void)scratch; (void)nt;
}
#endif

