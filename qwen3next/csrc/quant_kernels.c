/* Decode-time CPU kernels for quantized weights (formats: qwen3next/quant/int8.py, int4.py; docs/format.md).
 *
 * Same approach as decode_kernels.c: matrix-vector products that stream the weights once, with
 * activations widened to fp32 and fp32 accumulation. Fewer bytes per weight is the point: decode is
 * bound by reading weights, so 8-bit weights halve and 4-bit weights (4.5 bits with their scales)
 * nearly quarter the bytes a bf16 step reads.
 */
#include "common.h"

/* y[m, r] = scale[r] * sum_k q[r, k] x[m, k]: int8 weights with one fp32 scale per row. */
void q3n_linear_q8(const int8_t *q, const float *scale, const uint16_t *x, uint16_t *y, int64_t rows_x, int64_t out,
                   int64_t in, int threads) {
    float *xf = widen(x, rows_x * in);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < out; r++) {
        const int8_t *row = q + r * in;
        for (int64_t m = 0; m < rows_x; m++) {
            const float *xm = xf + m * in;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t k = 0; k < in; k++) acc += (float)row[k] * xm[k];
            y[m * out + r] = f32_to_bf16(acc * scale[r]);
        }
    }
    free(xf);
}

/* sum_g scale[g] * sum_i q[g, i] x[g, i] over one packed row (the minimum's share is added by the
 * caller), split into even (low nibble) and odd (high nibble) activations. */
static float q4_row_dot_portable(const uint8_t *row, const uint16_t *scale, const float *xe, const float *xo,
                                 int64_t groups, int64_t half_group) {
    float total = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        float dot = 0.0f;
        for (int64_t j = g * half_group; j < (g + 1) * half_group; j++)
            dot += (float)(row[j] & 0xF) * xe[j] + (float)(row[j] >> 4) * xo[j];
        total += f16_to_f32(scale[g]) * dot;
    }
    return total;
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* The same with AVX-512: each group's products stay in a vector and are scaled and accumulated there,
 * so a row costs one horizontal sum instead of one per group (the compiler's version of the loop
 * above pays a reduction per group and runs ~10x slower). */
static float q4_row_dot(const uint8_t *row, const uint16_t *scale, const float *xe, const float *xo, int64_t groups,
                        int64_t half_group) {
    if (half_group % 16) return q4_row_dot_portable(row, scale, xe, xo, groups, half_group);
    const __m512i low_nibble = _mm512_set1_epi32(0xF);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512 dot = _mm512_setzero_ps();
        for (int64_t j = g * half_group; j < (g + 1) * half_group; j += 16) {
            __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + j)));
            dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bytes, low_nibble)), _mm512_loadu_ps(xe + j), dot);
            dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), _mm512_loadu_ps(xo + j), dot);
        }
        acc = _mm512_fmadd_ps(dot, _mm512_set1_ps(f16_to_f32(scale[g])), acc);
    }
    return _mm512_reduce_add_ps(acc);
}
#else
#define q4_row_dot q4_row_dot_portable
#endif

/* y[m, r] = sum_g scale[r, g] * sum_i q[r, g, i] x[m, g, i] + minimum[r, g] * sum_i x[m, g, i]:
 * 4-bit codes two per byte (even index in the low nibble), fp16 scale and minimum per group.
 * x is split into its even and odd elements once per call so the inner loop reads both nibbles
 * of a byte against contiguous activations, and each group's activation sum is computed once. */
void q3n_linear_q4(const uint8_t *packed, const uint16_t *scale, const uint16_t *minimum, int64_t group,
                   const uint16_t *x, uint16_t *y, int64_t rows_x, int64_t out, int64_t in, int threads) {
    const int64_t half = in / 2, groups = in / group, half_group = group / 2;
    float *even = malloc(sizeof(float) * (size_t)(rows_x * (in + groups)));
    float *odd = even + rows_x * half, *sums = odd + rows_x * half;
    for (int64_t m = 0; m < rows_x; m++)
        for (int64_t g = 0; g < groups; g++) {
            float total = 0.0f;
            for (int64_t j = g * half_group; j < (g + 1) * half_group; j++) {
                float a = bf16_to_f32(x[m * in + 2 * j]), b = bf16_to_f32(x[m * in + 2 * j + 1]);
                even[m * half + j] = a;
                odd[m * half + j] = b;
                total += a + b;
            }
            sums[m * groups + g] = total;
        }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < out; r++) {
        const uint8_t *row = packed + r * half;
        for (int64_t m = 0; m < rows_x; m++) {
            const float *xe = even + m * half, *xo = odd + m * half;
            float acc = q4_row_dot(row, scale + r * groups, xe, xo, groups, half_group);
            for (int64_t g = 0; g < groups; g++) acc += f16_to_f32(minimum[r * groups + g]) * sums[m * groups + g];
            y[m * out + r] = f32_to_bf16(acc);
        }
    }
    free(even);
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

/* An activation vector made ready for either format: fp32 values, their even/odd split and per-group
 * sums (4 bits). Preparing once per vector keeps the per-row work to streaming the codes. */
typedef struct {
    float *full, *even, *odd, *sums;
} prepared;

static void prepare(prepared *p, const float *x, int64_t n, int64_t group) {
    p->full = (float *)x;
    const int64_t groups = n / group, half_group = group / 2;
    for (int64_t g = 0; g < groups; g++) {
        float total = 0.0f;
        for (int64_t j = g * half_group; j < (g + 1) * half_group; j++) {
            p->even[j] = x[2 * j];
            p->odd[j] = x[2 * j + 1];
            total += x[2 * j] + x[2 * j + 1];
        }
        p->sums[g] = total;
    }
}

/* Row r of a projection times a prepared vector. */
static inline float projection_row_dot(const uint8_t *blob, const q3n_projection *p, int64_t r, const prepared *x) {
    if (p->bits == 8) {
        const int8_t *row = (const int8_t *)(blob + p->codes) + r * p->cols;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < p->cols; k++) acc += (float)row[k] * x->full[k];
        return acc * ((const float *)(blob + p->scale))[r];
    }
    const int64_t groups = p->cols / p->group;
    const uint16_t *scale = (const uint16_t *)(blob + p->scale) + r * groups;
    const uint16_t *minimum = (const uint16_t *)(blob + p->minimum) + r * groups;
    float acc = q4_row_dot(blob + p->codes + r * (p->cols / 2), scale, x->even, x->odd, groups, p->group / 2);
    for (int64_t g = 0; g < groups; g++) acc += f16_to_f32(minimum[g]) * x->sums[g];
    return acc;
}

/* out = sum_i weights[i] * down_i(silu(gate_i x) * up_i x) over the k experts ids[i], whose blobs start at
 * blobs[ids[i]]. Phase 1 computes every chosen expert's activations (k * inter rows of gate and up),
 * phase 2 every output row of the k down projections. */
void q3n_experts_quant(const int64_t *blobs, const q3n_expert_layout *layout, const int64_t *ids,
                       const float *weights, int64_t k, const uint16_t *x, uint16_t *out, int threads) {
    const q3n_projection *gate = &layout->gate, *up = &layout->up, *down = &layout->down;
    const int64_t hidden = gate->cols, inter = gate->rows;
    const int64_t x_group = gate->bits == 4 ? gate->group : (up->bits == 4 ? up->group : 2);
    const int64_t act_group = down->bits == 4 ? down->group : 2;
    /* one allocation: x (widened, split, sums), activations, and their split and sums per expert */
    float *buffer = malloc(sizeof(float) * (size_t)(2 * hidden + hidden / x_group + k * (2 * inter + inter / act_group)));
    float *xf = buffer, *x_split = xf + hidden, *acts = x_split + hidden + hidden / x_group;
    float *act_split = acts + k * inter;
    for (int64_t i = 0; i < hidden; i++) xf[i] = bf16_to_f32(x[i]);
    prepared px = {0}, pa[k];
    px.even = x_split, px.odd = x_split + hidden / 2, px.sums = x_split + hidden;
    prepare(&px, xf, hidden, x_group);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t j = 0; j < k * inter; j++) {
            const uint8_t *blob = (const uint8_t *)(intptr_t)blobs[ids[j / inter]];
            const int64_t r = j % inter;
            acts[j] = silu(projection_row_dot(blob, gate, r, &px)) * projection_row_dot(blob, up, r, &px);
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < k; i++) {
            float *split = act_split + i * (inter + inter / act_group);
            pa[i].even = split, pa[i].odd = split + inter / 2, pa[i].sums = split + inter;
            prepare(&pa[i], acts + i * inter, inter, act_group);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < hidden; r++) {
            float acc = 0.0f;
            for (int64_t i = 0; i < k; i++)
                acc += weights[i] * projection_row_dot((const uint8_t *)(intptr_t)blobs[ids[i]], down, r, &pa[i]);
            out[r] = f32_to_bf16(acc);
        }
    }
    free(buffer);
}
