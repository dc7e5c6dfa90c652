/* Shared by the CPU kernel sources (decode_kernels.c, quant_kernels.c, build_info.c): the limits the
 * Python side reads back, which vector paths a build takes, number conversions and the fp32-accumulating
 * bf16 dot product. Functions are static inline: each source gets its own copy. */
#ifndef Q3N_COMMON_H
#define Q3N_COMMON_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else /* built without OpenMP: one thread */
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif

/* Defined here only: cpu_kernels.py reads them from the loaded library (build_info.c). */
#define Q3N_MAX_ROWS 8        /* activation rows up to which the matrix-vector kernels beat a GEMM */
#define Q3N_MAX_CONV_KERNEL 8 /* the longest causal conv the DeltaNet kernel takes; longer ones run in torch */

/* The vector paths of this build, from the compiler's target macros (-march=native, narrowed by
 * QWEN3NEXT_KERNEL_CFLAGS); q3n_isa() reports the same choice. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define Q3N_AVX512 1
#if defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define Q3N_VNNI 1 /* integer dot products for the quantized kernels */
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#define Q3N_AVX2 1
#endif
#if !defined(Q3N_VNNI) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define Q3N_AVX2_DOTS 1 /* integer dot products on 256 bits for the quantized kernels */
#if defined(__AVXVNNI__)
#define Q3N_AVX_VNNI 1 /* ... with AVX-VNNI's one-instruction dot products (Alder Lake, Zen 5 and later) */
#endif
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define Q3N_AVX2_LOOPS 1 /* fp32 row loops on 256 bits for the shapes the integer paths leave (AVX-512 builds too) */
#endif
#if defined(Q3N_AVX512) || defined(Q3N_AVX2) || defined(Q3N_AVX2_LOOPS) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(Q3N_AVX2) || defined(Q3N_AVX2_LOOPS)
/* 8 bf16 values at p as fp32 lanes (a bf16 is the top half of its fp32). */
static inline __m256 widen8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#endif

/* The threads of a parallel region over `units` units of work: no more than there are units (an idle
 * thread only waits at the region's barrier). */
static inline int team_for(int64_t units, int threads) { return units < threads ? (int)(units > 0 ? units : 1) : threads; }

/* int64_t q3n_sizeof_TYPE(void): the Python side compares it with its ctypes mirror of TYPE at load. */
#define Q3N_EXPORT_SIZEOF(type) \
    int64_t q3n_sizeof_##type(void) { return (int64_t)sizeof(type); }

#ifdef Q3N_LIBMVEC
/* glibc's libmvec has vector versions of expf; declaring them lets loops that call silu vectorise
 * (glibc itself declares them only under -ffast-math, which would also change our rounding). */
#pragma omp declare simd notinbranch
float expf(float);
#endif

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    uint32_t rounded = bits + 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)((f != f ? 0x7FC00000u : rounded) >> 16); /* NaN stays a quiet NaN */
}

static inline float dot_bf16_f32(const uint16_t *w, const float *x, int64_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; i++) acc += bf16_to_f32(w[i]) * x[i];
    return acc;
}

static inline float *widen(const uint16_t *x, int64_t n) {
    float *out = malloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++) out[i] = bf16_to_f32(x[i]);
    return out;
}

static inline float silu(float x) { return x / (1.0f + expf(-x)); }

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* y[i] = v, as fp32 (f32_out: logits, unrounded) or rounded to bf16 (every other output). */
static inline void store_output(void *y, int64_t i, float v, int f32_out) {
    if (f32_out) ((float *)y)[i] = v;
    else ((uint16_t *)y)[i] = f32_to_bf16(v);
}

#if defined(__F16C__)
static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); } /* one instruction */
#else
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
    if (exponent == 0) { /* zero or subnormal: mantissa * 2^-24 */
        float f = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    if (exponent == 31) bits = sign | 0x7F800000u | (mantissa << 13);
    else bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#endif

/* Where one projection of a routed expert lives, and its format: its arrays' byte offsets from the address in
 * column `piece` of the expert's row of the layer's address table (quantized blobs, quant/layout.py: one column,
 * the blob; bf16 experts: three, the gate, up and down matrices, each at offset 0). */
typedef struct {
    int64_t bits, rows, cols, group; /* bits 16: bf16, 8 or 4: quantized; group: input weights per scale (4 bits) */
    int64_t codes, scale, minimum;   /* byte offsets (scale: quantized only; minimum: 4 bits only) */
    int64_t piece;
} q3n_projection;

typedef struct {
    q3n_projection gate, up, down;
    int64_t pieces; /* columns of the address table */
} q3n_expert_layout;

/* One weight matrix [rows, cols] in whichever format the checkpoint stores it. */
typedef struct {
    int64_t bits;                 /* 16: bf16 weights; 8: int8 codes + fp32 row scales; 4: packed int4 + bf16 groups */
    const void *codes;            /* the weights, or the codes */
    const void *scale, *minimum;  /* unused for bf16; minimum only for 4-bit */
    int64_t rows, cols, group;    /* group: columns per 4-bit scale */
} q3n_matrix;

/* The weights of a sparse MoE block with bf16 routed experts, as the decode kernels read them. */
typedef struct {
    const uint16_t *router;     /* [experts, hidden] */
    int64_t experts, top_k, norm_topk;
    const int64_t *table;       /* [experts, 3] addresses of each expert's gate, up, down */
    int64_t inter;
    const uint16_t *shared_gate, *shared_up, *shared_down; /* [shared_inter, hidden] x2, [hidden, shared_inter] */
    int64_t shared_inter;
    const uint16_t *shared_expert_gate; /* [1, hidden] */
} q3n_moe_weights;

/* The per-op kernels (decode_kernels.c, quant_kernels.c) that layer_kernels.c chains into whole layer steps. */
void q3n_moe_block_bf16(const uint16_t *x, uint16_t *out, const q3n_moe_weights *m, int64_t hidden, int64_t tokens,
                        int64_t *ids, float *weights, float *logits, int threads);
void q3n_route_top_k(const float *logits, int64_t experts, int64_t top_k, int norm_topk, int64_t *ids,
                     float *weights);
void q3n_experts_quant(const int64_t *table, const q3n_expert_layout *layout, const int64_t *ids,
                       const float *weights, int64_t n, int64_t k, const uint16_t *x, uint16_t *out, int threads);
void q3n_linear_bf16(const uint16_t *w, const uint16_t *x, void *y, int64_t rows_x, int64_t out, int64_t in,
                     int f32_out, int threads);
void q3n_linear_q8(const int8_t *q, const float *scale, const uint16_t *x, void *y, int64_t rows_x, int64_t out,
                   int64_t in, int f32_out, int threads);
void q3n_linear_quant_many(const q3n_matrix *ms, int count, const uint16_t *x, uint16_t *const *ys, int64_t rows_x,
                           int threads);
void q3n_linear_q4(const uint8_t *packed, const uint16_t *scale, const uint16_t *minimum, int64_t group,
                   const uint16_t *x, void *y, int64_t rows_x, int64_t out, int64_t in, int f32_out, int threads);
void q3n_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t rows, int64_t dim, float eps,
                       float offset);
void q3n_attend_one_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t kv_heads,
                         int64_t group, int64_t length, int64_t dim, int64_t head_stride, float scale, int threads);
void q3n_gated_delta_bf16(const uint16_t *qkvz, const uint16_t *ba, const uint16_t *conv_weight,
                          uint16_t *conv_state, const uint16_t *A_log, const uint16_t *dt_bias,
                          const uint16_t *norm_weight, float *state, uint16_t *out, float *kept_state,
                          uint16_t *kept_conv, int64_t tokens, int64_t k_heads,
                          int64_t v_heads, int64_t dk, int64_t dv, int64_t kernel, float eps, int threads);

#endif
