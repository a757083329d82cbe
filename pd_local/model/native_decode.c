// A whole decoder layer for decode rows (one query token per sequence), one call per layer.
// x [M, hidden] is updated in place: x += attn(norm1(x)); x += mlp(norm2(x)). Activations are
// rounded to the model dtype where torch's ops would round them (each op's output), while sums
// run in fp32, so a bf16 layer stays close to the torch path; every row is computed alone, by
// the same instructions whatever M or the thread count.
// Built with native_linear.c into one library (native_linear.py).
#include "native_simd.h"

#if ISA
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
    double t0 = pdl_prof_on ? now_s() : 0;
#pragma omp parallel for num_threads(nt) if (M * KV > 1) schedule(static)
    for (long mg = 0; mg < M * KV; mg++) {
        long m = mg / KV;
        attend(L, q + m * NQ * D, att + m * NQ * D, tables + m * W, ctx[m], mg % KV);
    }
    if (pdl_prof_on) pdl_prof_s[1] += now_s() - t0;
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
long pdl_layer_scratch(const void *L, long M) { (void)L; (void)M; return 0; }
void pdl_decode_layer(const void *L, void *x, const void *cos, const void *sin, const long *slots,
                      const long *tables, long W, const long *ctx, long M, float *scratch, int nt) {
    (void)L; (void)x; (void)cos; (void)sin; (void)slots; (void)tables; (void)W; (void)ctx; (void)M;
    (void)scratch; (void)nt;
}
#endif
