/* Decode-time CPU kernels for quantized weights (formats: qwen3next/quant/int8.py, int4.py; docs/format.md).
 *
 * Matrix-vector products that stream the weights once. Fewer bytes per weight is the point: decode
 * is bound by reading weights, so 8-bit weights halve and 4-bit weights (4.5 bits with their scales)
 * nearly quarter what a bf16 step reads, provided the arithmetic keeps up with the memory. Widening
 * every code to fp32 does not (it runs at ~16 G weights/s here, under DRAM speed), so on CPUs with
 * AVX-512 VNNI the activation vector is turned into int16 codes, one fp32 scale per block of 64
 * (a 2^-16 step relative to the block's largest value, far finer than bf16's own 2^-8), and rows are
 * multiplied with integer dot-product instructions (vpdpwssd: 32 products per instruction), each
 * block's int32 sum scaled once. Other CPUs take plain fp32 loops.
 *
 * An activation vector is prepared once (codes, even/odd split for the 4-bit nibbles, per-group
 * sums for the 4-bit minimum) and reused by every row of every matrix that reads it.
 */
#include "common.h"

#define XBLOCK 64 /* activation values sharing one int16 scale */

/* An activation vector x [n] in the forms the row dots read. */
typedef struct {
    int64_t n, group;      /* group: the 4-bit group `sums` is for */
    float *f;              /* fp32 values */
    float *even, *odd;     /* fp32 x[2j], x[2j+1] (the low and high nibbles' partners) */
    float *sums;           /* [n / group]: sum of x over each 4-bit group */
    int16_t *q, *even_q, *odd_q; /* int16 codes of x, whole and split */
    float *block_scale;    /* [n / XBLOCK]: x ~ q * block_scale */
    int8_t *even_b, *odd_b; /* int8 codes of the split x, for 4-bit weights */
    float *block_scale_b;  /* [n / XBLOCK]: x ~ code * block_scale_b */
} prepared;

static void prepare(prepared *p, const float *x, int64_t n, int64_t group) {
    const int64_t groups = group ? n / group : 0, blocks = n / XBLOCK;
    p->n = n, p->group = group;
    p->f = malloc(sizeof(float) * (size_t)(2 * n + groups + 2 * blocks) + sizeof(int16_t) * (size_t)(2 * n) + (size_t)n);
    p->even = p->f + n, p->odd = p->even + n / 2, p->sums = p->odd + n / 2, p->block_scale = p->sums + groups;
    p->block_scale_b = p->block_scale + blocks;
    p->q = (int16_t *)(p->block_scale_b + blocks), p->even_q = p->q + n, p->odd_q = p->even_q + n / 2;
    p->even_b = (int8_t *)(p->odd_q + n / 2), p->odd_b = p->even_b + n / 2;
    memcpy(p->f, x, sizeof(float) * (size_t)n);
    for (int64_t j = 0; j < n / 2; j++) p->even[j] = x[2 * j], p->odd[j] = x[2 * j + 1];
    for (int64_t g = 0; g < groups; g++) {
        float total = 0.0f;
        for (int64_t i = g * group; i < (g + 1) * group; i++) total += x[i];
        p->sums[g] = total;
    }
    for (int64_t b = 0; b < blocks; b++) {
        float largest = 0.0f;
        for (int64_t i = b * XBLOCK; i < (b + 1) * XBLOCK; i++) largest = fmaxf(largest, fabsf(x[i]));
        float inverse = largest > 0.0f ? 32767.0f / largest : 0.0f;
        p->block_scale[b] = largest / 32767.0f;
        for (int64_t i = b * XBLOCK; i < (b + 1) * XBLOCK; i++) p->q[i] = (int16_t)lrintf(x[i] * inverse);
        float inverse_b = largest > 0.0f ? 127.0f / largest : 0.0f;
        p->block_scale_b[b] = largest / 127.0f;
        for (int64_t j = b * XBLOCK / 2; j < (b + 1) * XBLOCK / 2; j++) {
            p->even_b[j] = (int8_t)lrintf(x[2 * j] * inverse_b);
            p->odd_b[j] = (int8_t)lrintf(x[2 * j + 1] * inverse_b);
        }
    }
    for (int64_t j = 0; j < blocks * XBLOCK / 2; j++) p->even_q[j] = p->q[2 * j], p->odd_q[j] = p->q[2 * j + 1];
}

static void prepare_bf16(prepared *p, const uint16_t *x, int64_t n, int64_t group) {
    float *xf = widen(x, n);
    prepare(p, xf, n, group);
    free(xf);
}

static void release(prepared *p) { free(p->f); }

/* ---- one row of an int8 matrix (one fp32 scale per row, applied by the caller) ---- */

static inline float q8_row_dot(const int8_t *row, const prepared *x) {
#ifdef Q3N_VNNI
    if (x->n % XBLOCK == 0) {
        __m512 acc = _mm512_setzero_ps(), acc2 = acc; /* two accumulators: short rows are latency-bound */
        for (int64_t b = 0; b < x->n / XBLOCK; b++) {
            const int8_t *w = row + b * XBLOCK;
            __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)w));
            __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + 32)));
            __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(x->q + b * XBLOCK));
            dot = _mm512_dpwssd_epi32(dot, w1, _mm512_loadu_si512(x->q + b * XBLOCK + 32));
            if (b & 1) acc2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(x->block_scale[b]), acc2);
            else acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(x->block_scale[b]), acc);
        }
        return _mm512_reduce_add_ps(_mm512_add_ps(acc, acc2));
    }
#endif
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < x->n; k++) acc += (float)row[k] * x->f[k];
    return acc;
}

/* ---- one row of a 4-bit matrix: codes two per byte (even index in the low nibble), fp16 scale and
 * minimum per group: sum_g scale[g] * sum_i q[g, i] x[g, i] + minimum[g] * sum_i x[g, i] ---- */

static inline float q4_minimum_share(const uint16_t *minimum, const prepared *x, int64_t groups) {
#ifdef Q3N_VNNI
    __m512 sum = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
        __mmask16 lanes = groups - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
        sum = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, minimum + g)),
                              _mm512_maskz_loadu_ps(lanes, x->sums + g), sum);
    }
    return _mm512_reduce_add_ps(sum);
#else
    float acc = 0.0f;
    for (int64_t g = 0; g < groups; g++) acc += f16_to_f32(minimum[g]) * x->sums[g];
    return acc;
#endif
}

static inline float q4_row_dot(const uint8_t *row, const uint16_t *scale, const uint16_t *minimum, const prepared *x) {
    const int64_t group = x->group, groups = x->n / group, half_group = group / 2;
#ifdef Q3N_VNNI
    if (group == XBLOCK && groups % 2 == 0) {
        /* 4-bit codes are coarse enough that int8 activation codes lose nothing that matters (their step is
         * 1/127 of the block's largest value; the weights' is 1/15 of their group's range), and bytes
         * double the work per instruction: vpdpbusd multiplies 64 code/activation pairs. One 64-byte
         * load covers two groups; lanes 0-7 of the int32 sums belong to the first, 8-15 to the second. */
        const __m512i nibble = _mm512_set1_epi8(0xF);
        const __m512i pair_index = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        __m512 acc = _mm512_setzero_ps(), acc2 = acc; /* two accumulators: short rows are latency-bound */
        for (int64_t g0 = 0; g0 < groups; g0 += 16) {
            __mmask16 lanes = groups - g0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (groups - g0)) - 1);
            __m512 scales = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, scale + g0)),
                                          _mm512_maskz_loadu_ps(lanes, x->block_scale_b + g0));
            for (int64_t g = g0; g < g0 + 16 && g < groups; g += 2) {
                __m512i bytes = _mm512_loadu_si512(row + g * 32);
                __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(bytes, nibble),
                                                  _mm512_loadu_si512(x->even_b + g * 32));
                dot = _mm512_dpbusd_epi32(dot, _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble),
                                          _mm512_loadu_si512(x->odd_b + g * 32));
                __m512 pair = _mm512_permutexvar_ps(_mm512_add_epi32(pair_index, _mm512_set1_epi32((int)(g - g0))), scales);
                if (g & 2) acc2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), pair, acc2);
                else acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), pair, acc);
            }
        }
        return _mm512_reduce_add_ps(_mm512_add_ps(acc, acc2)) + q4_minimum_share(minimum, x, groups);
    }
    if (group % XBLOCK == 0) { /* integer dot per block of 64 weights (32 bytes), scaled by weight and x scales */
        const __m512i nibble = _mm512_set1_epi16(0xF);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            const float weight_scale = f16_to_f32(scale[g]);
            for (int64_t b = g * (group / XBLOCK); b < (g + 1) * (group / XBLOCK); b++) {
                __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(row + b * 32)));
                __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_and_si512(bytes, nibble),
                                                  _mm512_loadu_si512(x->even_q + b * 32));
                dot = _mm512_dpwssd_epi32(dot, _mm512_srli_epi16(bytes, 4), _mm512_loadu_si512(x->odd_q + b * 32));
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(weight_scale * x->block_scale[b]), acc);
            }
        }
        return _mm512_reduce_add_ps(acc) + q4_minimum_share(minimum, x, groups);
    }
#endif
    float total = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = g * half_group; j < (g + 1) * half_group; j++)
            dot += (float)(row[j] & 0xF) * x->even[j] + (float)(row[j] >> 4) * x->odd[j];
        total += f16_to_f32(scale[g]) * dot;
    }
    return total + q4_minimum_share(minimum, x, groups);
}

/* ---- dense matrices: y [rows_x, out] = x [rows_x, in] @ W.T ---- */

/* int8 weights q [out, in] with one fp32 scale per row; y in bf16, or in fp32 with f32_out. */
void q3n_linear_q8(const int8_t *q, const float *scale, const uint16_t *x, void *y, int64_t rows_x, int64_t out,
                   int64_t in, int f32_out, int threads) {
    prepared xs[rows_x];
    for (int64_t m = 0; m < rows_x; m++) prepare_bf16(&xs[m], x + m * in, in, 0);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < out; r++)
        for (int64_t m = 0; m < rows_x; m++)
            store_output(y, m * out + r, q8_row_dot(q + r * in, &xs[m]) * scale[r], f32_out);
    for (int64_t m = 0; m < rows_x; m++) release(&xs[m]);
}

/* 4-bit weights: packed [out, in / 2], scale and minimum [out, in / group] (fp16); y as in q3n_linear_q8. */
void q3n_linear_q4(const uint8_t *packed, const uint16_t *scale, const uint16_t *minimum, int64_t group,
                   const uint16_t *x, void *y, int64_t rows_x, int64_t out, int64_t in, int f32_out, int threads) {
    const int64_t groups = in / group;
    prepared xs[rows_x];
    for (int64_t m = 0; m < rows_x; m++) prepare_bf16(&xs[m], x + m * in, in, group);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < out; r++)
        for (int64_t m = 0; m < rows_x; m++)
            store_output(y, m * out + r,
                         q4_row_dot(packed + r * in / 2, scale + r * groups, minimum + r * groups, &xs[m]), f32_out);
    for (int64_t m = 0; m < rows_x; m++) release(&xs[m]);
}

/* ---- routed experts packed one blob each (quant/layout.py): one token through k of them ---- */

/* Where one projection lives inside an expert blob, and its format. */
typedef struct {
    int64_t bits, rows, cols, group; /* group: input weights per scale (4 bits) */
    int64_t codes, scale, minimum;   /* byte offsets in the blob (minimum: 4 bits only) */
} q3n_projection;

typedef struct {
    q3n_projection gate, up, down;
} q3n_expert_layout;
Q3N_EXPORT_SIZEOF(q3n_projection)
Q3N_EXPORT_SIZEOF(q3n_expert_layout)

/* Row r of a projection inside `blob` times a vector prepared for that projection's format. */
static inline float projection_row_dot(const uint8_t *blob, const q3n_projection *p, int64_t r, const prepared *x) {
    if (p->bits == 8) return q8_row_dot((const int8_t *)(blob + p->codes) + r * p->cols, x) * ((const float *)(blob + p->scale))[r];
    const int64_t groups = p->cols / p->group;
    return q4_row_dot(blob + p->codes + r * (p->cols / 2), (const uint16_t *)(blob + p->scale) + r * groups,
                      (const uint16_t *)(blob + p->minimum) + r * groups, x);
}

static inline int64_t sums_group(const q3n_projection *p) { return p->bits == 4 ? p->group : 0; }

/* out = sum_i weights[i] * down_i(silu(gate_i x) * up_i x) over the k experts ids[i], whose blobs start
 * at blobs[ids[i]]. Phase 1 computes every chosen expert's activations (k * inter rows of gate and
 * up), rounded to bf16 as the reference's bf16 matmuls round them; phase 2 every output row of the k
 * down projections. gate and up must share a 4-bit group size when both are 4-bit (the caller checks). */
void q3n_experts_quant(const int64_t *blobs, const q3n_expert_layout *layout, const int64_t *ids,
                       const float *weights, int64_t k, const uint16_t *x, uint16_t *out, int threads) {
    const q3n_projection *gate = &layout->gate, *up = &layout->up, *down = &layout->down;
    const int64_t hidden = gate->cols, inter = gate->rows;
    prepared px, pa[k];
    prepare_bf16(&px, x, hidden, sums_group(gate) ? sums_group(gate) : sums_group(up));
    float *acts = malloc(sizeof(float) * (size_t)(k * inter + hidden)), *sums = acts + k * inter;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t j = 0; j < k * inter; j++) {
            const uint8_t *blob = (const uint8_t *)(intptr_t)blobs[ids[j / inter]];
            const int64_t r = j % inter;
            float g = round_bf16(projection_row_dot(blob, gate, r, &px));
            float u = round_bf16(projection_row_dot(blob, up, r, &px));
            acts[j] = round_bf16(round_bf16(silu(g)) * u);
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < k; i++) prepare(&pa[i], acts + i * inter, inter, sums_group(down));
        /* expert by expert, so each thread streams one expert's rows at a time (its rows of every
         * expert: a static schedule over the same range gives each thread the same rows each time) */
        for (int64_t i = 0; i < k; i++) {
            const uint8_t *blob = (const uint8_t *)(intptr_t)blobs[ids[i]];
#pragma omp for schedule(static) nowait
            for (int64_t r = 0; r < hidden; r++) sums[r] = (i ? sums[r] : 0.0f) + weights[i] * projection_row_dot(blob, down, r, &pa[i]);
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t r = 0; r < hidden; r++) out[r] = f32_to_bf16(sums[r]);
    }
    for (int64_t i = 0; i < k; i++) release(&pa[i]);
    release(&px);
    free(acts);
}
