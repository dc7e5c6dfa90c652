/* CPU kernels for quantized weights (formats: qwen3next/quant/int8.py, int4.py; docs/format.md;
 * figures in docs/kernels.md).
 *
 * Products of one, a few or many activation rows with a quantized matrix. Decode is bound by reading
 * weights, so 8-bit weights halve and 4-bit weights (4.5 bits with their scales) nearly quarter what a
 * bf16 step reads, provided the arithmetic keeps up with the memory; prefill chunks and verify passes
 * are bound by the arithmetic. Widening every code to fp32 does not keep up (~16 G weights/s here), so
 * on CPUs with AVX-512 VNNI activation rows are turned into integer codes once per call (int16 for
 * 8-bit weights, int8 for 4-bit ones, one fp32 scale per block of 64) and multiplied with integer
 * dot-product instructions over tiles, so that each weight is unpacked once per tile of activation
 * rows and each activation block loaded once per tile of weight rows, as llama.cpp's repacked GEMMs
 * do: 4-bit tiles hold 16 weight rows in the vector lanes (a row's 4 code bytes per lane against 4
 * broadcast activation bytes), 8-bit tiles 4 x 4 row pairs. CPUs with AVX2 but no AVX-512 take the same
 * codes (Q3N_AVX2_DOTS) with vpmaddwd / vpmaddubsw, or AVX-VNNI's vpdpwssd / vpdpbusd on 256 bits where the
 * CPU has them (Q3N_AVX_VNNI): 4-bit tiles of 8 rows in the lanes, 8-bit weights one row at a time; others
 * plain fp32 loops, one row pair at a time. The routed-experts call (q3n_experts_pairs) also takes bf16
 * experts (bf16_tile), for prefill on CPUs whose bf16 GEMM is slow.
 *
 * Every (weight row, activation row) pair has its own accumulator and the same sequence of
 * operations whatever the tile it falls in and however many rows share the call, so a row's
 * result is bit-identical alone or in a block of 512 (speculative verification relies on it).
 */
#include "common.h"

#define XBLOCK 64 /* activation values sharing one integer-code scale */
#define TILE_W 16  /* weight rows per unit of work (the 4-bit tile: one per vector lane) */
#define Q8_TILE_W 4 /* weight rows per 8-bit tile (with at least TILE_X activation rows) */
#define TILE_X 4    /* activation rows per tile (their accumulators stay in registers) */
#define LANES_FEW 4 /* activation rows up to which the 4-bit tiles read their weight rows one after another */
/* Where the AVX-512 4-bit tile reads its weight rows in order for a few activation rows (q4_tile_few):
 * rows of at least FEW_ROWS_COLUMNS weights, or matrices of at least FEW_ROWS_WEIGHTS. */
#define FEW_ROWS_COLUMNS 1024
#define FEW_ROWS_WEIGHTS (1 << 20)
#define PREFETCH 8   /* chunks of 64 bytes a tile prefetches ahead in each of its rows */
/* Chunks of 64 bytes q4_row_sums16 prefetches ahead in the row it reads: 2 KiB, so that the read is in flight
 * for a DRAM latency (8, the side-by-side tile's distance, read 1-4 rows from RAM 11-17% slower: docs/kernels.md).
 * QWEN3NEXT_KERNEL_CFLAGS=-DPREFETCH_IN_ORDER=N measures another distance. */
#ifndef PREFETCH_IN_ORDER
#define PREFETCH_IN_ORDER 32
#endif
#define X_ROWS 64   /* activation rows per pass over a dense matrix: their codes stay in the core's cache */

/* An activation vector x [n] in the forms the dots of a call's matrices read (forms_of). */
typedef struct {
    int64_t n, group;       /* group: the 4-bit group `sums` is for */
    float *f;               /* fp32 values */
    float *even, *odd;      /* fp32 x[2j], x[2j+1] (the low and high nibbles' partners) */
    float *sums;            /* [n / group]: sum of x over each 4-bit group */
    int16_t *q, *even_q, *odd_q; /* int16 codes of x, whole and split */
    float *block_scale;     /* [n / XBLOCK]: x ~ q * block_scale */
    int8_t *even_b, *odd_b; /* int8 codes of the split x, for 4-bit weights */
    float *block_scale_b;   /* [n / XBLOCK]: x ~ code * block_scale_b */
    int32_t *centre_b;      /* [n / XBLOCK]: 8 * the sum of a block's int8 codes (4-bit codes centred on 8) */
} prepared;

enum { X_FP32 = 1, X_SPLIT = 2, X_INT16 = 4, X_SPLIT_INT16 = 8, X_INT8 = 16 }; /* the forms, as flags */

/* Each call prepares its activation rows, and a decode step makes a hundred such calls on rows of a few
 * hundred values, so only the forms asked for are built (the 4-bit group sums whenever group is set). */
static void prepare(prepared *p, const float *x, int64_t n, int64_t group, int forms) {
    const int64_t groups = group ? n / group : 0, blocks = n / XBLOCK;
    p->n = n, p->group = group;
    p->f = malloc(sizeof(float) * (size_t)(2 * n + groups + 2 * blocks) + sizeof(int32_t) * (size_t)blocks +
                  sizeof(int16_t) * (size_t)(2 * n) + (size_t)n);
    p->even = p->f + n, p->odd = p->even + n / 2, p->sums = p->odd + n / 2, p->block_scale = p->sums + groups;
    p->block_scale_b = p->block_scale + blocks;
    p->centre_b = (int32_t *)(p->block_scale_b + blocks);
    p->q = (int16_t *)(p->centre_b + blocks), p->even_q = p->q + n, p->odd_q = p->even_q + n / 2;
    p->even_b = (int8_t *)(p->odd_q + n / 2), p->odd_b = p->even_b + n / 2;
    if (forms & X_FP32) memcpy(p->f, x, sizeof(float) * (size_t)n);
    if (forms & X_SPLIT)
        for (int64_t j = 0; j < n / 2; j++) p->even[j] = x[2 * j], p->odd[j] = x[2 * j + 1];
    for (int64_t g = 0; g < groups; g++) {
        float total = 0.0f;
        for (int64_t i = g * group; i < (g + 1) * group; i++) total += x[i];
        p->sums[g] = total;
    }
    const int int16 = forms & (X_INT16 | X_SPLIT_INT16), int8 = forms & X_INT8;
    for (int64_t b = 0; b < blocks && (int16 || int8); b++) {
        float largest = 0.0f;
        for (int64_t i = b * XBLOCK; i < (b + 1) * XBLOCK; i++) largest = fabsf(x[i]) > largest ? fabsf(x[i]) : largest;
        if (int16) {
            const float inverse = largest > 0.0f ? 32767.0f / largest : 0.0f;
            p->block_scale[b] = largest / 32767.0f;
            for (int64_t i = b * XBLOCK; i < (b + 1) * XBLOCK; i++) p->q[i] = (int16_t)lrintf(x[i] * inverse);
        }
        if (int8) {
            const float inverse = largest > 0.0f ? 127.0f / largest : 0.0f;
            p->block_scale_b[b] = largest / 127.0f;
            int32_t codes = 0;
            for (int64_t j = b * XBLOCK / 2; j < (b + 1) * XBLOCK / 2; j++) {
                p->even_b[j] = (int8_t)lrintf(x[2 * j] * inverse);
                p->odd_b[j] = (int8_t)lrintf(x[2 * j + 1] * inverse);
                codes += p->even_b[j] + p->odd_b[j];
            }
            p->centre_b[b] = 8 * codes;
        }
    }
    if (forms & X_SPLIT_INT16)
        for (int64_t j = 0; j < blocks * XBLOCK / 2; j++) p->even_q[j] = p->q[2 * j], p->odd_q[j] = p->q[2 * j + 1];
}

static void prepare_bf16(prepared *p, const uint16_t *x, int64_t n, int64_t group, int forms) {
    float *xf = widen(x, n);
    prepare(p, xf, n, group, forms);
    free(xf);
}

static void release(prepared *p) { free(p->f); }

/* A matrix [rows, cols]: int8 codes with one fp32 scale per row, 4-bit codes two per byte (even index in the
 * low nibble) with an fp16 scale and minimum per group of `group` weights per row, or (bits 16) bf16 weights. */
typedef struct {
    int64_t bits, rows, cols, group;
    const uint8_t *codes;
    const void *scale;
    const uint16_t *minimum; /* 4 bits only */
} matrix;

/* Whether w's dots take the integer paths on this build (the tiles, or q8_rows_avx2): whole blocks of 64,
 * and for 4 bits groups of 64 in 64-byte chunks (the VNNI tile) or groups of any multiple of 64 (AVX2). */
static inline int q8_integer(const matrix *w) {
#if defined(Q3N_VNNI) || defined(Q3N_AVX2_DOTS)
    return w->cols % XBLOCK == 0;
#else
    (void)w;
    return 0;
#endif
}
static inline int q4_integer(const matrix *w) {
#if defined(Q3N_VNNI)
    return w->group == XBLOCK && w->cols % (2 * XBLOCK) == 0;
#elif defined(Q3N_AVX2_DOTS)
    return w->group % XBLOCK == 0;
#else
    (void)w;
    return 0;
#endif
}
/* VNNI's one-row 4-bit dot on int16 codes, for the groups of a multiple of 64 the tile leaves. */
static inline int q4_int16_rows(const matrix *w) {
#ifdef Q3N_VNNI
    return w->group % XBLOCK == 0;
#else
    (void)w;
    return 0;
#endif
}

/* The forms of an activation row that w's dots read (tile_dots and q4_row_dot branch on the same tests). */
static int forms_of(const matrix *w) {
    if (w->bits == 16) return X_FP32;
    if (w->bits == 8) return q8_integer(w) ? X_INT16 : X_FP32;
    return q4_integer(w) ? X_INT8 : q4_int16_rows(w) ? X_SPLIT_INT16 : X_SPLIT;
}

/* ---- row dots: one (weight row, activation row) pair, for shapes and CPUs the tiles do not cover ---- */

#ifdef Q3N_AVX2_LOOPS
static inline float sum_lanes(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#endif

static inline float q8_row_dot(const matrix *w, int64_t r, const prepared *x) {
    const int8_t *row = (const int8_t *)w->codes + r * w->cols;
    float acc = 0.0f;
    int64_t k = 0;
#ifdef Q3N_AVX2_LOOPS /* the compiler's vectorisation of the loop below ran at ~1.5 G weights/s here */
#define Q3N_WIDEN8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    for (; k + 16 <= x->n; k += 16) {
        a0 = _mm256_fmadd_ps(Q3N_WIDEN8(row + k), _mm256_loadu_ps(x->f + k), a0);
        a1 = _mm256_fmadd_ps(Q3N_WIDEN8(row + k + 8), _mm256_loadu_ps(x->f + k + 8), a1);
    }
    for (; k + 8 <= x->n; k += 8) a0 = _mm256_fmadd_ps(Q3N_WIDEN8(row + k), _mm256_loadu_ps(x->f + k), a0);
#undef Q3N_WIDEN8
    acc = sum_lanes(_mm256_add_ps(a0, a1));
#endif
    for (; k < x->n; k++) acc += (float)row[k] * x->f[k];
    return acc * ((const float *)w->scale)[r];
}

static inline float q4_minimum_share(const uint16_t *minimum, const prepared *x, int64_t groups) {
    float acc = 0.0f;
    for (int64_t g = 0; g < groups; g++) acc += f16_to_f32(minimum[g]) * x->sums[g];
    return acc;
}

/* sum_g scale[g] * sum_i q[g, i] x[g, i] + minimum[g] * sum_i x[g, i] */
static inline float q4_row_dot(const matrix *w, int64_t r, const prepared *x) {
    const int64_t group = x->group, groups = x->n / group, half_group = group / 2;
    const uint8_t *row = w->codes + r * (w->cols / 2);
    const uint16_t *scale = (const uint16_t *)w->scale + r * groups, *minimum = w->minimum + r * groups;
#ifdef Q3N_VNNI
    if (q4_int16_rows(w)) { /* integer dot per block of 64 weights (32 bytes), scaled by weight and x scales */
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
#ifdef Q3N_AVX2_LOOPS /* any even group (the demo model's 56-wide rows): 16 weights widened to fp32 a step */
    const __m128i nibble = _mm_set1_epi8(0xF);
    __m256 acc = _mm256_setzero_ps();
    float rest = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        __m256 low = _mm256_setzero_ps(), high = low;
        float tail = 0.0f;
        int64_t j = g * half_group;
        for (; j + 8 <= (g + 1) * half_group; j += 8) {
            const __m128i bytes = _mm_loadl_epi64((const __m128i *)(row + j));
            const __m256 even = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(bytes, nibble)));
            const __m256 odd = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble)));
            low = _mm256_fmadd_ps(even, _mm256_loadu_ps(x->even + j), low);
            high = _mm256_fmadd_ps(odd, _mm256_loadu_ps(x->odd + j), high);
        }
        for (; j < (g + 1) * half_group; j++) tail += (float)(row[j] & 0xF) * x->even[j] + (float)(row[j] >> 4) * x->odd[j];
        const float weight_scale = f16_to_f32(scale[g]);
        acc = _mm256_fmadd_ps(_mm256_add_ps(low, high), _mm256_set1_ps(weight_scale), acc);
        rest += weight_scale * tail;
    }
    return sum_lanes(acc) + rest + q4_minimum_share(minimum, x, groups);
#else
    float total = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = g * half_group; j < (g + 1) * half_group; j++)
            dot += (float)(row[j] & 0xF) * x->even[j] + (float)(row[j] >> 4) * x->odd[j];
        total += f16_to_f32(scale[g]) * dot;
    }
    return total + q4_minimum_share(minimum, x, groups);
#endif
}

/* call(count) for a count of 1 to 4 rows, the count a constant in each call so that loops unroll and
 * accumulators live in registers. */
#define Q3N_CONSTANT_ROWS(count, call) \
    switch (count) {                   \
    case 1: call(1); break;            \
    case 2: call(2); break;            \
    case 3: call(3); break;            \
    default: call(4); break;           \
    }

/* One tile call per TILE_X activation rows. */
#define Q3N_TILE_ROWS(call)                                                       \
    for (int64_t m0 = 0; m0 < nx; m0 += TILE_X) {                                 \
        Q3N_CONSTANT_ROWS(nx - m0 >= TILE_X ? TILE_X : (int)(nx - m0), call)      \
    }

/* ---- tiles: dots[m * TILE_W + i] = row r0 + i of w times xs[m], for i < nw <= TILE_W, m < nx ---- */

#if defined(Q3N_VNNI) || defined(Q3N_AVX2_DOTS)
/* Prefetch byte `at` of a row of `length` bytes, or past its end the same distance into the row a tile of
 * `tile` rows further on: a tile reads its rows side by side, which the hardware prefetchers do not follow
 * as they follow one row after another (one-row decode from RAM ran at half speed without this). */
static inline void prefetch_ahead(const uint8_t *row, int64_t length, int tile, int64_t at) {
    _mm_prefetch((const char *)(at < length ? row + at : row + tile * length + (at - length)), _MM_HINT_T0);
}

/* Lane k of the result = the sum of the 8 lanes of p[k]. */
static inline __m256i sum_each8(const __m256i p[8]) {
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
    /* a holds, in 128-bit lane h, the sums of elements 4h .. 4h + 3 of p[0..3]; b those of p[4..7] */
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

/* The `lanes` rows of a 4-bit tile from r0 (rows past nw repeat row r0) and their scales and minimums; the
 * next tile's scales and minimums are prefetched, which would otherwise start it cold. */
static inline void q4_tile_rows(const matrix *w, int64_t r0, int nw, int lanes, const uint8_t **rows,
                                const uint16_t **scale_rows, const uint16_t **minimum_rows) {
    const int64_t groups = w->cols / w->group, half = w->cols / 2;
    for (int l = 0; l < lanes; l++) {
        const int64_t r = r0 + (l < nw ? l : 0);
        rows[l] = w->codes + r * half, scale_rows[l] = (const uint16_t *)w->scale + r * groups;
        minimum_rows[l] = w->minimum + r * groups;
        for (int64_t at = 0; at < 2 * groups; at += 64) {
            prefetch_ahead((const uint8_t *)scale_rows[l], 2 * groups, lanes, 2 * groups + at);
            prefetch_ahead((const uint8_t *)minimum_rows[l], 2 * groups, lanes, 2 * groups + at);
        }
    }
}
#endif

#ifdef Q3N_VNNI

/* 8 bits: Q8_TILE_W rows, int16 codes (dpwssd: 32 products), each pair's sum reduced across lanes at the end. */
static inline __attribute__((always_inline)) void q8_tile_at(const matrix *w, int64_t r0, const int nw,
                                                             const prepared *const *xs, const int nx, float *dots) {
    __m512 acc[TILE_X][Q8_TILE_W];
    for (int m = 0; m < nx; m++)
        for (int i = 0; i < nw; i++) acc[m][i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < w->cols / XBLOCK; b++) {
        __m512i w0[Q8_TILE_W], w1[Q8_TILE_W];
        for (int i = 0; i < nw; i++) {
            const int8_t *row = (const int8_t *)w->codes + (r0 + i) * w->cols + b * XBLOCK;
            prefetch_ahead((const uint8_t *)row - b * XBLOCK, w->cols, nw, (b + PREFETCH) * XBLOCK);
            w0[i] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)row));
            w1[i] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(row + 32)));
        }
        for (int m = 0; m < nx; m++) {
            const __m512i x0 = _mm512_loadu_si512(xs[m]->q + b * XBLOCK), x1 = _mm512_loadu_si512(xs[m]->q + b * XBLOCK + 32);
            const __m512 x_scale = _mm512_set1_ps(xs[m]->block_scale[b]);
            for (int i = 0; i < nw; i++) {
                __m512i dot = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), w0[i], x0), w1[i], x1);
                acc[m][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), x_scale, acc[m][i]);
            }
        }
    }
    for (int m = 0; m < nx; m++)
        for (int i = 0; i < nw; i++) dots[m * TILE_W + i] = _mm512_reduce_add_ps(acc[m][i]) * ((const float *)w->scale)[r0 + i];
}

/* Fewer than TILE_X activation rows (decode) take the weight rows one at a time: read side by side, 8-bit
 * rows streamed from RAM at half the speed of one row after another, and the rows' bits are the same. */
static void q8_tile(const matrix *w, int64_t r0, int nw, const prepared *const *xs, int64_t nx, float *dots) {
    const int side_by_side = nx >= TILE_X ? Q8_TILE_W : 1;
    for (int i = 0; i < nw; i += side_by_side) {
#define Q3N_Q8_CALL(rows_x) q8_tile_at(w, r0 + i, Q8_TILE_W, xs + m0, rows_x, dots + m0 * TILE_W + i)
#define Q3N_Q8_ONE(rows_x) q8_tile_at(w, r0 + j, 1, xs + m0, rows_x, dots + m0 * TILE_W + j)
        if (side_by_side == Q8_TILE_W && nw - i >= Q8_TILE_W) Q3N_TILE_ROWS(Q3N_Q8_CALL)
        else
            for (int j = i; j < i + side_by_side && j < nw; j++) Q3N_TILE_ROWS(Q3N_Q8_ONE)
#undef Q3N_Q8_CALL
#undef Q3N_Q8_ONE
    }
}

/* out[e] = dword e of every v[l] (lane l): a 16 x 16 transpose of 32-bit elements. */
static inline void transpose16(const __m512i v[16], __m512i out[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]), t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
    for (int i = 0; i < 16; i += 4) {
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]), u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]), u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* u[4q + i] holds, in 128-bit lane k, dword 4k + i of rows 4q .. 4q + 3 */
    for (int i = 0; i < 4; i++) {
        __m512i a = _mm512_shuffle_i32x4(u[i], u[4 + i], 0x88), b = _mm512_shuffle_i32x4(u[i], u[4 + i], 0xDD);
        __m512i c = _mm512_shuffle_i32x4(u[8 + i], u[12 + i], 0x88), d = _mm512_shuffle_i32x4(u[8 + i], u[12 + i], 0xDD);
        out[i] = _mm512_shuffle_i32x4(a, c, 0x88), out[8 + i] = _mm512_shuffle_i32x4(a, c, 0xDD);
        out[4 + i] = _mm512_shuffle_i32x4(b, d, 0x88), out[12 + i] = _mm512_shuffle_i32x4(b, d, 0xDD);
    }
}

/* out[g] (g < groups) = the fp16 values of column g of rows[0..15] as fp32 lanes: a tile's scales or minimums. */
static void q4_columns(const uint16_t *const rows[16], int64_t groups, __m512 *out) {
    for (int64_t g0 = 0; g0 < groups; g0 += 32) {
        __mmask32 lanes = groups - g0 >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (groups - g0)) - 1);
        __m512i v[16], t[16];
        for (int l = 0; l < 16; l++) v[l] = _mm512_maskz_loadu_epi16(lanes, rows[l] + g0);
        transpose16(v, t);
        for (int e = 0; e < 16 && g0 + 2 * e < groups; e++) {
            out[g0 + 2 * e] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(t[e]));
            if (g0 + 2 * e + 1 < groups) out[g0 + 2 * e + 1] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(t[e], 16)));
        }
    }
}

/* q4_columns for 8 groups (rows of 512 weights) when the tile's 16 rows lie one after another ([16][8] fp16, 256
 * bytes in four vectors): two rounds of two-source word permutes, 8 instead of the 16 x 16 dword transpose, three
 * quarters of whose lanes would be empty. The same values in the same lanes. */
static void q4_columns_of_8(const uint16_t *block, __m512 *out) {
    static const uint16_t by_column[2][32] = { /* from 8 rows (two vectors): word 8c + r = row r's group c (c < 4) */
        {0, 8, 16, 24, 32, 40, 48, 56, 1, 9, 17, 25, 33, 41, 49, 57, 2, 10, 18, 26, 34, 42, 50, 58, 3, 11, 19, 27, 35, 43, 51, 59},
        {4, 12, 20, 28, 36, 44, 52, 60, 5, 13, 21, 29, 37, 45, 53, 61, 6, 14, 22, 30, 38, 46, 54, 62, 7, 15, 23, 31, 39, 47, 55, 63}};
    static const uint16_t two_columns[2][32] = { /* from rows 0-7 and 8-15 of columns 0-3: columns 0, 1 or 2, 3 */
        {0, 1, 2, 3, 4, 5, 6, 7, 32, 33, 34, 35, 36, 37, 38, 39, 8, 9, 10, 11, 12, 13, 14, 15, 40, 41, 42, 43, 44, 45, 46, 47},
        {16, 17, 18, 19, 20, 21, 22, 23, 48, 49, 50, 51, 52, 53, 54, 55, 24, 25, 26, 27, 28, 29, 30, 31, 56, 57, 58, 59, 60, 61, 62, 63}};
    __m512i v[4];
    for (int q = 0; q < 4; q++) v[q] = _mm512_loadu_si512(block + 32 * q); /* rows 4q .. 4q + 3 */
    for (int h = 0; h < 2; h++) { /* groups 4h .. 4h + 3 */
        const __m512i index = _mm512_loadu_si512(by_column[h]);
        const __m512i top = _mm512_permutex2var_epi16(v[0], index, v[1]), bottom = _mm512_permutex2var_epi16(v[2], index, v[3]);
        for (int k = 0; k < 2; k++) {
            const __m512i pair = _mm512_permutex2var_epi16(top, _mm512_loadu_si512(two_columns[k]), bottom);
            out[4 * h + 2 * k] = _mm512_cvtph_ps(_mm512_castsi512_si256(pair));
            out[4 * h + 2 * k + 1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(pair, 1));
        }
    }
}

/* A tile's scales or minimums, by the cheaper way where it applies. */
static inline void q4_tile_columns(const uint16_t *const rows[16], int64_t groups, __m512 *out) {
    if (groups == 8 && rows[15] == rows[0] + 15 * 8) q4_columns_of_8(rows[0], out);
    else q4_columns(rows, groups, out);
}

/* 4 bits: TILE_W rows in the 16 lanes. Each 64-byte chunk (two groups) of the 16 rows is transposed once, so
 * that a vector holds 4 code bytes of every row and vpdpbusd against 4 broadcast activation bytes adds 64
 * products into 16 per-row sums; a group's int32 sums, centred on code 8 as q4_row_avx2's are, are then
 * scaled into per-row fp32 sums, group after group in order, and the share of the centre and minimums added
 * last. Rows past nw repeat row r0 (their lanes are dropped). */
static inline __attribute__((always_inline)) void q4_chunk_rows(const __m512i *codes, const __m512 *scale, int64_t c,
                                                                const prepared *const *xs, const int nx, float *acc) {
    __m512 total[TILE_X];
    for (int m = 0; m < nx; m++) total[m] = _mm512_loadu_ps(acc + 16 * m);
#pragma GCC unroll 2
    for (int h = 0; h < 2; h++) { /* group 2c + h: dwords 8h .. 8h + 7 (bytes 32h .. 32h + 31) of the chunk */
        __m512i low[TILE_X], high[TILE_X];
        for (int m = 0; m < nx; m++) low[m] = high[m] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int e = 8 * h; e < 8 * h + 8; e++)
            for (int m = 0; m < nx; m++) {
                int32_t even, odd;
                memcpy(&even, xs[m]->even_b + 64 * c + 4 * e, 4), memcpy(&odd, xs[m]->odd_b + 64 * c + 4 * e, 4);
                low[m] = _mm512_dpbusd_epi32(low[m], codes[e], _mm512_set1_epi32(even));
                high[m] = _mm512_dpbusd_epi32(high[m], codes[16 + e], _mm512_set1_epi32(odd));
            }
        for (int m = 0; m < nx; m++) {
            const __m512 both = _mm512_mul_ps(scale[2 * c + h], _mm512_set1_ps(xs[m]->block_scale_b[2 * c + h]));
            const __m512i centred = _mm512_sub_epi32(_mm512_add_epi32(low[m], high[m]), _mm512_set1_epi32(xs[m]->centre_b[2 * c + h]));
            total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(centred), both, total[m]);
        }
    }
    for (int m = 0; m < nx; m++) _mm512_storeu_ps(acc + 16 * m, total[m]);
}

/* A 16-row tile's rows, and its scales and minimums in the lanes, group by group (groups of 64); the minimums
 * with the centre's share, minimum + 8 scale, added in (the codes are centred on 8). */
static inline void q4_tile_start(const matrix *w, int64_t r0, int nw, const uint8_t *rows[16], __m512 *scale,
                                 __m512 *minimum) {
    const int64_t groups = w->cols / XBLOCK;
    const uint16_t *scale_rows[16], *minimum_rows[16];
    q4_tile_rows(w, r0, nw, 16, rows, scale_rows, minimum_rows);
    q4_tile_columns(scale_rows, groups, scale);
    q4_tile_columns(minimum_rows, groups, minimum);
    for (int64_t g = 0; g < groups; g++) minimum[g] = _mm512_fmadd_ps(scale[g], _mm512_set1_ps(8.0f), minimum[g]);
}

/* Pairs of lanes of a and b added: lanes 0-7 of the result are a's lanes 2j + 2j+1, lanes 8-15 b's. Applied
 * three times to 8 vectors of two blocks' 8 partial sums each, it leaves the 16 blocks' sums in order. */
static inline __m512i add_lane_pairs(__m512i a, __m512i b) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    return _mm512_add_epi32(_mm512_permutex2var_epi32(a, even, b), _mm512_permutex2var_epi32(a, odd, b));
}

/* Few activation rows: each of the tile's 16 rows read front to back, as it lies in memory, and each block's
 * integer sum with each activation row formed along the row (a 64-byte load is two blocks: dwords 0-7 and
 * 8-15 of the dot products, reduced pairwise by add_lane_pairs as soon as two loads are done, which keeps the
 * shuffles per block down): sums[(m * 16 + l) * stride + b] for row l, block b, activation row m. */
static inline __attribute__((always_inline)) void q4_row_sums16(const uint8_t *const rows[16], int64_t blocks,
                                                                const prepared *const *xs, const int nx, int32_t *sums,
                                                                int64_t stride) {
    const __m512i nibble = _mm512_set1_epi8(0xF);
    const int8_t *even[LANES_FEW], *odd[LANES_FEW]; /* held here: the stores below may alias xs as far as the compiler knows */
    for (int m = 0; m < nx; m++) even[m] = xs[m]->even_b, odd[m] = xs[m]->odd_b;
    for (int l = 0; l < 16; l++)
        for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
            __m512i pairs[LANES_FEW][4]; /* per two loads: 4 blocks' sums of 4 partials each */
#pragma GCC unroll 4
            for (int k = 0; k < 8; k += 2) {
                __m512i dot[LANES_FEW][2];
#pragma GCC unroll 2
                for (int j = 0; j < 2; j++) {
                    const int64_t c = b0 / 2 + k + j; /* the chunk of blocks 2c and 2c + 1 */
                    if (2 * c >= blocks) {
                        for (int m = 0; m < nx; m++) dot[m][j] = _mm512_setzero_si512();
                        continue;
                    }
                    _mm_prefetch((const char *)(rows[l] + 64 * (c + PREFETCH_IN_ORDER)), _MM_HINT_T0);
                    const __m512i bytes = _mm512_loadu_si512(rows[l] + 64 * c);
                    const __m512i low = _mm512_and_si512(bytes, nibble), high = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
                    for (int m = 0; m < nx; m++)
                        dot[m][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), low,
                                                                            _mm512_loadu_si512(even[m] + 64 * c)),
                                                        high, _mm512_loadu_si512(odd[m] + 64 * c));
                }
                for (int m = 0; m < nx; m++) pairs[m][k / 2] = add_lane_pairs(dot[m][0], dot[m][1]);
            }
            for (int m = 0; m < nx; m++) {
                const __m512i all = add_lane_pairs(add_lane_pairs(pairs[m][0], pairs[m][1]),
                                                   add_lane_pairs(pairs[m][2], pairs[m][3]));
                _mm512_storeu_si512(sums + (m * 16 + l) * stride + b0, all);
            }
        }
}

/* q4_tile for up to LANES_FEW activation rows (decode, a short verify pass): the rows' block sums from
 * q4_row_sums16, transposed into the lanes, then scaled and summed in q4_tile's order, so the bits are q4_tile's.
 * q4_tile reads its 16 rows side by side, which streamed one activation row through [4096-16384, 2048] matrices
 * from RAM at 12-15 GB/s here, against 24-28 GB/s read in order (docs/kernels.md). Short rows of a small matrix
 * (below FEW_ROWS_COLUMNS and FEW_ROWS_WEIGHTS: the hidden-512 model's experts) keep the side-by-side tile,
 * which measured ahead on them. */
static void q4_tile_few(const matrix *w, int64_t r0, int nw, const prepared *const *xs, int64_t nx, float *dots) {
    const int64_t blocks = w->cols / XBLOCK, stride = (blocks + 15) / 16 * 16;
    const uint8_t *rows[16];
    __m512 scale[blocks], minimum[blocks];
    q4_tile_start(w, r0, nw, rows, scale, minimum);
    int32_t sums[LANES_FEW * 16 * stride];
#define Q3N_ROW_SUMS(rows_x) q4_row_sums16(rows, blocks, xs, rows_x, sums, stride)
    Q3N_CONSTANT_ROWS(nx, Q3N_ROW_SUMS)
#undef Q3N_ROW_SUMS
    /* Each activation row's sum is one chain of multiply-adds in block order; the rows' chains take turns,
     * 16 blocks at a time, so that one waits on its adds while another is transposed. */
    __m512 total[LANES_FEW];
    for (int64_t m = 0; m < nx; m++) total[m] = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < blocks; b0 += 16)
        for (int64_t m = 0; m < nx; m++) {
            const prepared *x = xs[m];
            __m512i by_row[16], by_block[16];
            for (int l = 0; l < 16; l++) by_row[l] = _mm512_loadu_si512(sums + (m * 16 + l) * stride + b0);
            transpose16(by_row, by_block);
            for (int64_t b = b0; b < b0 + 16 && b < blocks; b++) {
                const __m512 both = _mm512_mul_ps(scale[b], _mm512_set1_ps(x->block_scale_b[b]));
                const __m512i centred = _mm512_sub_epi32(by_block[b - b0], _mm512_set1_epi32(x->centre_b[b]));
                total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(centred), both, total[m]);
            }
        }
    for (int64_t m = 0; m < nx; m++) {
        for (int64_t g = 0; g < blocks; g++) total[m] = _mm512_fmadd_ps(minimum[g], _mm512_set1_ps(xs[m]->sums[g]), total[m]);
        _mm512_storeu_ps(dots + 16 * m, total[m]);
    }
}

static void q4_tile(const matrix *w, int64_t r0, int nw, const prepared *const *xs, int64_t nx, float *dots) {
    if (nx <= LANES_FEW && (w->cols >= FEW_ROWS_COLUMNS || w->rows * w->cols >= FEW_ROWS_WEIGHTS)) {
        q4_tile_few(w, r0, nw, xs, nx, dots);
        return;
    }
    const int64_t groups = w->cols / XBLOCK, half = w->cols / 2;
    const uint8_t *rows[16];
    __m512 scale[groups], minimum[groups];
    q4_tile_start(w, r0, nw, rows, scale, minimum);
    const __m512i nibble = _mm512_set1_epi8(0xF);
    float *acc = dots; /* per-row sums, 16 lanes per activation row: dots is [nx][TILE_W] */
    memset(acc, 0, sizeof(float) * (size_t)(nx * TILE_W));
    for (int64_t c = 0; c < half / 64; c++) {
        __m512i v[16], t[16], codes[32];
        for (int l = 0; l < 16; l++) {
            prefetch_ahead(rows[l], half, 16, 64 * (c + PREFETCH));
            v[l] = _mm512_loadu_si512(rows[l] + 64 * c);
        }
        transpose16(v, t);
        for (int e = 0; e < 16; e++)
            codes[e] = _mm512_and_si512(t[e], nibble), codes[16 + e] = _mm512_and_si512(_mm512_srli_epi16(t[e], 4), nibble);
#define Q3N_Q4_CALL(rows_x) q4_chunk_rows(codes, scale, c, xs + m0, rows_x, acc + 16 * m0)
        Q3N_TILE_ROWS(Q3N_Q4_CALL)
#undef Q3N_Q4_CALL
    }
    for (int64_t m = 0; m < nx; m++) {
        __m512 total = _mm512_loadu_ps(acc + 16 * m);
        for (int64_t g = 0; g < groups; g++) total = _mm512_fmadd_ps(minimum[g], _mm512_set1_ps(xs[m]->sums[g]), total);
        _mm512_storeu_ps(acc + 16 * m, total);
    }
}
#endif

#ifdef Q3N_AVX2_DOTS
/* AVX2 without AVX-512 (most desktop CPUs): the same integer codes of the activation rows. 8 bits: one
 * weight row at a time against up to TILE_X activation rows, read front to back (the hardware prefetchers
 * follow one row well); vpmaddwd forms the int16 products vpdpwssd sums (AVX-VNNI's vpdpwssd where the CPU
 * has it: the same sums). Two fp32 accumulators take alternate blocks, so that a short row is not one chain
 * of dependent multiply-adds; every pair keeps them and their order whatever nx is. 4 bits: tiles of 8 rows
 * in the lanes (q4_lanes8). */
/* acc0 and acc1 take alternate blocks (even, odd) of 64: the loop pairs them so that both stay in registers. */
#define Q3N_ALTERNATE_BLOCKS(blocks, step)               \
    {                                                   \
        int64_t b = 0;                                  \
        for (; b + 1 < (blocks); b += 2) {              \
            step(b, acc0);                              \
            step(b + 1, acc1);                          \
        }                                               \
        if (b < (blocks)) step(b, acc0);                \
    }

/* acc + vpmaddwd(a, b), identical with or without AVX-VNNI (no sum comes near saturating int32). */
#ifdef Q3N_AVX_VNNI
#define Q3N_DPWSSD(acc, a, b) _mm256_dpwssd_avx_epi32((acc), (a), (b))
#else
#define Q3N_DPWSSD(acc, a, b) _mm256_add_epi32((acc), _mm256_madd_epi16((a), (b)))
#endif

static inline __attribute__((always_inline)) void q8_row_avx2(const matrix *w, int64_t r, const prepared *const *xs,
                                                              const int nx, float *dots) {
    const int8_t *row = (const int8_t *)w->codes + r * w->cols;
    __m256 acc0[TILE_X], acc1[TILE_X];
    for (int m = 0; m < nx; m++) acc0[m] = acc1[m] = _mm256_setzero_ps();
#define Q3N_Q8_BLOCK(b, acc)                                                                                               \
    {                                                                                                                     \
        __m256i wv[4];                                                                                                    \
        _mm_prefetch((const char *)(row + (b) * XBLOCK + PREFETCH * 64), _MM_HINT_T0);                                   \
        for (int q = 0; q < 4; q++) wv[q] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + (b) * XBLOCK + 16 * q))); \
        for (int m = 0; m < nx; m++) {                                                                                    \
            const int16_t *xq = xs[m]->q + (b) * XBLOCK;                                                                  \
            __m256i dot = _mm256_madd_epi16(wv[0], _mm256_loadu_si256((const __m256i *)xq));                              \
            for (int q = 1; q < 4; q++) dot = Q3N_DPWSSD(dot, wv[q], _mm256_loadu_si256((const __m256i *)(xq + 16 * q))); \
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(xs[m]->block_scale[b]), acc[m]);            \
        }                                                                                                                 \
    }
    Q3N_ALTERNATE_BLOCKS(w->cols / XBLOCK, Q3N_Q8_BLOCK)
#undef Q3N_Q8_BLOCK
    for (int m = 0; m < nx; m++) dots[m * TILE_W] = sum_lanes(_mm256_add_ps(acc0[m], acc1[m])) * ((const float *)w->scale)[r];
}

/* out[e] = dword e of every v[l] (lane l): an 8 x 8 transpose of 32-bit elements. */
static inline void transpose8(const __m256i v[8], __m256i out[8]) {
    __m256i t[8], u[8];
    for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_epi32(v[i], v[i + 1]), t[i + 1] = _mm256_unpackhi_epi32(v[i], v[i + 1]);
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]), u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]), u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* u[4q + k] holds, in 128-bit lane h, dword 4h + k of rows 4q .. 4q + 3 */
    for (int k = 0; k < 4; k++)
        out[k] = _mm256_permute2x128_si256(u[k], u[4 + k], 0x20), out[4 + k] = _mm256_permute2x128_si256(u[k], u[4 + k], 0x31);
}

/* out[g] (g < groups) = the fp16 values of column g of rows[0..7] as fp32 lanes: a tile's scales or minimums,
 * eight columns at a time by an 8 x 8 transpose of 16-bit elements. */
static void q4_columns8(const uint16_t *const rows[8], int64_t groups, __m256 *out) {
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
        __m128i v[8], a[8], b[8];
        for (int l = 0; l < 8; l++) v[l] = _mm_loadu_si128((const __m128i *)(rows[l] + g));
        for (int l = 0; l < 8; l += 2) a[l] = _mm_unpacklo_epi16(v[l], v[l + 1]), a[l + 1] = _mm_unpackhi_epi16(v[l], v[l + 1]);
        for (int q = 0; q < 8; q += 4) /* b[q + k]: columns 2k, 2k + 1 of rows q .. q + 3 */
            for (int k = 0; k < 2; k++)
                b[q + 2 * k] = _mm_unpacklo_epi32(a[q + k], a[q + k + 2]), b[q + 2 * k + 1] = _mm_unpackhi_epi32(a[q + k], a[q + k + 2]);
        for (int k = 0; k < 4; k++) {
            out[g + 2 * k] = _mm256_cvtph_ps(_mm_unpacklo_epi64(b[k], b[4 + k]));
            out[g + 2 * k + 1] = _mm256_cvtph_ps(_mm_unpackhi_epi64(b[k], b[4 + k]));
        }
    }
    for (; g < groups; g++) {
        uint16_t column[8];
        for (int l = 0; l < 8; l++) column[l] = rows[l][g];
        out[g] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)column));
    }
}

static inline __m256i broadcast4(const int8_t *codes) {
    int32_t four;
    memcpy(&four, codes, 4);
    return _mm256_set1_epi32(four);
}

/* acc + the 8 rows' exact integer sums of block b with x, centred and scaled, as the AVX-512 tile does it. */
static inline __m256 q4_scaled_block(const __m256i sum, const __m256 scale, int64_t b, const prepared *x, const __m256 acc) {
    const __m256 both = _mm256_mul_ps(scale, _mm256_set1_ps(x->block_scale_b[b]));
    const __m256i centred = _mm256_sub_epi32(sum, _mm256_set1_epi32(x->centre_b[b]));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(centred), both, acc);
}

/* One block of 64 weights (32 bytes) of the tile's 8 rows, transposed and split into codes[e] (low nibbles,
 * dword e) and codes[8 + e] (high nibbles), against nx activation rows: each lane's integer sum is the
 * block's whole dot product for its row, exact (vpmaddubsw's pair sums, at most 2 * 15 * 127, are added in
 * int16 eight at a time, below 32767, then widened; with AVX-VNNI vpdpbusd adds the same numbers), then
 * centred and scaled into the row's fp32 sums (q4_scaled_block). */
static inline __attribute__((always_inline)) void q4_block_rows_avx2(const __m256i *codes, const __m256 scale, int64_t b,
                                                                     const prepared *const *xs, const int nx, float *acc) {
    __m256i sum[TILE_X];
#ifdef Q3N_AVX_VNNI
    for (int m = 0; m < nx; m++) sum[m] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int e = 0; e < 8; e++)
        for (int m = 0; m < nx; m++) {
            sum[m] = _mm256_dpbusd_avx_epi32(sum[m], codes[e], broadcast4(xs[m]->even_b + 32 * b + 4 * e));
            sum[m] = _mm256_dpbusd_avx_epi32(sum[m], codes[8 + e], broadcast4(xs[m]->odd_b + 32 * b + 4 * e));
        }
#else
    __m256i pairs[2][TILE_X]; /* dwords 0-3, 4-7: each lane's pair sums, at most 8 * 2 * 15 * 127 in int16 */
    for (int m = 0; m < nx; m++) pairs[0][m] = pairs[1][m] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int e = 0; e < 8; e++)
        for (int m = 0; m < nx; m++) {
            const __m256i low = _mm256_maddubs_epi16(codes[e], broadcast4(xs[m]->even_b + 32 * b + 4 * e));
            const __m256i high = _mm256_maddubs_epi16(codes[8 + e], broadcast4(xs[m]->odd_b + 32 * b + 4 * e));
            pairs[e / 4][m] = _mm256_add_epi16(pairs[e / 4][m], _mm256_add_epi16(low, high));
        }
    const __m256i ones = _mm256_set1_epi16(1);
    for (int m = 0; m < nx; m++) sum[m] = _mm256_add_epi32(_mm256_madd_epi16(pairs[0][m], ones), _mm256_madd_epi16(pairs[1][m], ones));
#endif
    for (int m = 0; m < nx; m++) _mm256_storeu_ps(acc + TILE_W * m, q4_scaled_block(sum[m], scale, b, xs[m], _mm256_loadu_ps(acc + TILE_W * m)));
}

/* Few activation rows: the tile's 8 rows read one after another, as they lie in memory (read side by side
 * they streamed from RAM at half the speed here, software prefetch or not), each block's integer sum formed
 * along its row: sums[(m * 8 + l) * stride + b] for row l, block b, activation row m. The same exact
 * integers as the transposed blocks give, so the steps after them, and the bits, are the same. */
static inline __attribute__((always_inline)) void q4_row_sums(const uint8_t *const rows[8], int64_t blocks,
                                                              const prepared *const *xs, const int nx, int32_t *sums, int64_t stride) {
    const __m256i nibble = _mm256_set1_epi8(0xF);
#ifndef Q3N_AVX_VNNI
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    for (int l = 0; l < 8; l++)
        for (int64_t b0 = 0; b0 < blocks; b0 += 8) {
            __m256i p[LANES_FEW][8];
            for (int k = 0; k < 8; k++) {
                const int64_t b = b0 + k;
                if (b >= blocks) {
                    for (int m = 0; m < nx; m++) p[m][k] = _mm256_setzero_si256();
                    continue;
                }
                if (!(b & 1)) _mm_prefetch((const char *)(rows[l] + 32 * b + 64 * PREFETCH), _MM_HINT_T0); /* as q8_row_avx2 */
                const __m256i bytes = _mm256_loadu_si256((const __m256i *)(rows[l] + 32 * b));
                const __m256i low = _mm256_and_si256(bytes, nibble), high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
                for (int m = 0; m < nx; m++) {
                    const __m256i even = _mm256_loadu_si256((const __m256i *)(xs[m]->even_b + 32 * b));
                    const __m256i odd = _mm256_loadu_si256((const __m256i *)(xs[m]->odd_b + 32 * b));
#ifdef Q3N_AVX_VNNI
                    p[m][k] = _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), low, even), high, odd);
#else
                    p[m][k] = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(low, even), _mm256_maddubs_epi16(high, odd)), ones);
#endif
                }
            }
            for (int m = 0; m < nx; m++) _mm256_storeu_si256((__m256i *)(sums + (m * 8 + l) * stride + b0), sum_each8(p[m]));
        }
}

/* 4 bits: 8 rows in the 8 lanes (the AVX-512 tile's layout at half width, any group of a multiple of 64).
 * Each block of the 8 rows is transposed once for all nx activation rows, so a row of activations costs its
 * dot products and one scaling per block for 8 weight rows, not per weight row as a row at a time did
 * (many rows through a matrix 1.3-1.5x faster: docs/kernels.md); up to LANES_FEW rows take q4_row_sums instead, for the
 * same bits. The codes are centred on 8: the rounding of the activation codes then meets weights of mean
 * near zero rather than codes of mean 7.5, which cuts its error about threefold (measured: 1.0% to 0.4% of
 * the largest output on a 64-wide lm_head); the share of the centre and minimums, sum_g (minimum[g] +
 * 8 scale[g]) * sum(x over g), exact in fp32, comes last. Rows past nw repeat row r0 (their lanes are dropped). */
static void q4_lanes8(const matrix *w, int64_t r0, int nw, const prepared *const *xs, int64_t nx, float *dots) {
    const int64_t groups = w->cols / w->group, per_group = w->group / XBLOCK, half = w->cols / 2, blocks = w->cols / XBLOCK;
    const uint8_t *rows[8];
    const uint16_t *scale_rows[8], *minimum_rows[8];
    q4_tile_rows(w, r0, nw, 8, rows, scale_rows, minimum_rows);
    __m256 scale[groups], minimum[groups];
    q4_columns8(scale_rows, groups, scale);
    q4_columns8(minimum_rows, groups, minimum);
    for (int64_t g = 0; g < groups; g++) minimum[g] = _mm256_fmadd_ps(scale[g], _mm256_set1_ps(8.0f), minimum[g]); /* the centre's share */
    float odd[nx * TILE_W]; /* the odd blocks' sums (dots takes the even ones): two chains of multiply-adds, not one */
    for (int64_t m = 0; m < nx; m++) _mm256_storeu_ps(dots + TILE_W * m, _mm256_setzero_ps()), _mm256_storeu_ps(odd + TILE_W * m, _mm256_setzero_ps());
    if (nx <= LANES_FEW) {
        const int64_t stride = (blocks + 7) / 8 * 8;
        int32_t sums[LANES_FEW * 8 * stride];
#define Q3N_ROW_SUMS(rows_x) q4_row_sums(rows, blocks, xs, rows_x, sums, stride)
        Q3N_CONSTANT_ROWS(nx, Q3N_ROW_SUMS)
#undef Q3N_ROW_SUMS
        for (int64_t m = 0; m < nx; m++) {
            __m256 total[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
            int64_t g = 0, group_end = per_group;
            for (int64_t b0 = 0; b0 < blocks; b0 += 8) {
                __m256i by_row[8], by_block[8];
                for (int l = 0; l < 8; l++) by_row[l] = _mm256_loadu_si256((const __m256i *)(sums + (m * 8 + l) * stride + b0));
                transpose8(by_row, by_block);
                for (int64_t b = b0; b < b0 + 8 && b < blocks; b++) {
                    if (b == group_end) g++, group_end += per_group;
                    total[b & 1] = q4_scaled_block(by_block[b - b0], scale[g], b, xs[m], total[b & 1]);
                }
            }
            _mm256_storeu_ps(dots + TILE_W * m, total[0]), _mm256_storeu_ps(odd + TILE_W * m, total[1]);
        }
    } else {
        const __m256i nibble = _mm256_set1_epi8(0xF);
        int64_t g = 0, group_end = per_group;
        for (int64_t b = 0; b < blocks; b++) {
            if (b == group_end) g++, group_end += per_group;
            __m256i v[8], t[8], codes[16];
            for (int l = 0; l < 8; l++) {
                if (!(b & 1)) prefetch_ahead(rows[l], half, 8, 32 * b + 2 * 64 * PREFETCH);
                v[l] = _mm256_loadu_si256((const __m256i *)(rows[l] + 32 * b));
            }
            transpose8(v, t);
            for (int e = 0; e < 8; e++)
                codes[e] = _mm256_and_si256(t[e], nibble), codes[8 + e] = _mm256_and_si256(_mm256_srli_epi16(t[e], 4), nibble);
#define Q3N_Q4_CALL(rows_x) q4_block_rows_avx2(codes, scale[g], b, xs + m0, rows_x, (b & 1 ? odd : dots) + TILE_W * m0)
            Q3N_TILE_ROWS(Q3N_Q4_CALL)
#undef Q3N_Q4_CALL
        }
    }
    for (int64_t m = 0; m < nx; m++) {
        __m256 share[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t k = 0; k < groups; k++) share[k & 3] = _mm256_fmadd_ps(minimum[k], _mm256_set1_ps(xs[m]->sums[k]), share[k & 3]);
        const __m256 blocks_sum = _mm256_add_ps(_mm256_loadu_ps(dots + TILE_W * m), _mm256_loadu_ps(odd + TILE_W * m));
        _mm256_storeu_ps(dots + TILE_W * m, _mm256_add_ps(blocks_sum, _mm256_add_ps(_mm256_add_ps(share[0], share[1]),
                                                                                   _mm256_add_ps(share[2], share[3]))));
    }
}

/* TILE_W rows as two tiles of 8 lanes. */
static void q4_tile_avx2(const matrix *w, int64_t r0, int nw, const prepared *const *xs, int64_t nx, float *dots) {
    for (int h = 0; 8 * h < nw; h++) q4_lanes8(w, r0 + 8 * h, nw - 8 * h < 8 ? nw - 8 * h : 8, xs, nx, dots + 8 * h);
}

static void q8_rows_avx2(const matrix *w, int64_t r0, int nw, const prepared *const *xs, int64_t nx, float *dots) {
    for (int i = 0; i < nw; i++) {
#define Q3N_Q8_ROW(rows_x) q8_row_avx2(w, r0 + i, xs + m0, rows_x, dots + m0 * TILE_W + i)
        Q3N_TILE_ROWS(Q3N_Q8_ROW)
#undef Q3N_Q8_ROW
    }
}
#undef Q3N_ALTERNATE_BLOCKS
#undef Q3N_DPWSSD
#endif

/* ---- bf16 weights: a prefill chunk's routed experts on CPUs whose bf16 GEMM is slow (no AVX-512) ---- */

#define BF16_COLUMNS 256 /* columns a bf16 tile's pass takes: its 16 weight rows (8 KB), 4 activation rows (4 KB) in L1 */

#ifdef Q3N_AVX2_LOOPS
/* acc[j * TILE_X + m] += columns [k0, k1) (multiples of 8) of weight row j (j < nj, rows `cols` apart from w) times
 * x[m] (m < nx): one accumulator per pair, lane l taking the columns 8c + l in ascending order. */
static inline __attribute__((always_inline)) void bf16_pass(const uint16_t *w, int64_t cols, const int nj, const float *const *x,
                                                            const int nx, int64_t k0, int64_t k1, __m256 *acc) {
    __m256 a[2][TILE_X];
    for (int j = 0; j < nj; j++)
        for (int m = 0; m < nx; m++) a[j][m] = acc[j * TILE_X + m];
    for (int64_t k = k0; k < k1; k += 8) {
        __m256 wv[2];
        for (int j = 0; j < nj; j++) wv[j] = widen8_bf16(w + j * cols + k);
        for (int m = 0; m < nx; m++) {
            const __m256 xv = _mm256_loadu_ps(x[m] + k);
            for (int j = 0; j < nj; j++) a[j][m] = _mm256_fmadd_ps(wv[j], xv, a[j][m]);
        }
    }
    for (int j = 0; j < nj; j++)
        for (int m = 0; m < nx; m++) acc[j * TILE_X + m] = a[j][m];
}
#endif

/* bf16 rows: each (weight row, activation row) pair sums in fp32, the same way wherever it falls in a tile (a row's
 * bits do not depend on the rows beside it). On AVX2 two weight rows meet four activation rows in registers, widened
 * from bf16 as they are loaded, BF16_COLUMNS columns a pass: 3.0-3.6x torch's grouped bf16 matmul (no AVX-512) on
 * a prefill's routed experts (bench_kernels.py --experts, docs/kernels.md). */
static void bf16_tile(const matrix *w, int64_t r0, int nw, const prepared *const *xs, int64_t nx, float *dots) {
    const int64_t cols = w->cols;
    const uint16_t *rows = (const uint16_t *)w->codes + r0 * cols;
#ifdef Q3N_AVX2_LOOPS
    const int64_t whole = cols / 8 * 8;
    for (int64_t m0 = 0; m0 < nx; m0 += TILE_X) {
        const int mx = nx - m0 < TILE_X ? (int)(nx - m0) : TILE_X;
        const float *x[TILE_X];
        __m256 acc[TILE_W * TILE_X];
        for (int m = 0; m < mx; m++) x[m] = xs[m0 + m]->f;
        for (int i = 0; i < TILE_W * TILE_X; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t k0 = 0; k0 < whole; k0 += BF16_COLUMNS) {
            const int64_t k1 = k0 + BF16_COLUMNS < whole ? k0 + BF16_COLUMNS : whole;
            for (int i = 0; i < nw; i += 2) {
#define Q3N_BF16_PASS(nj, rows_x) bf16_pass(rows + i * cols, cols, nj, x, rows_x, k0, k1, acc + i * TILE_X)
#define Q3N_BF16_PASSES(nj)                      \
    switch (mx) {                                \
    case 1: Q3N_BF16_PASS(nj, 1); break;         \
    case 2: Q3N_BF16_PASS(nj, 2); break;         \
    case 3: Q3N_BF16_PASS(nj, 3); break;         \
    default: Q3N_BF16_PASS(nj, 4); break;        \
    }
                if (nw - i >= 2) Q3N_BF16_PASSES(2) else Q3N_BF16_PASSES(1)
#undef Q3N_BF16_PASSES
#undef Q3N_BF16_PASS
            }
        }
        for (int i = 0; i < nw; i++)
            for (int m = 0; m < mx; m++) {
                float sum = sum_lanes(acc[i * TILE_X + m]);
                for (int64_t k = whole; k < cols; k++) sum += bf16_to_f32(rows[i * cols + k]) * x[m][k];
                dots[(m0 + m) * TILE_W + i] = sum;
            }
    }
#else
    for (int64_t m = 0; m < nx; m++)
        for (int i = 0; i < nw; i++) dots[m * TILE_W + i] = dot_bf16_f32(rows + i * cols, xs[m]->f, cols);
#endif
}

/* dots[m * TILE_W + i] = row r0 + i (i < nw <= TILE_W) of w times activation row xs[m] (m < nx). */
static void tile_dots(const matrix *w, int64_t r0, int nw, const prepared *const *xs, int64_t nx, float *dots) {
    if (w->bits == 16) return bf16_tile(w, r0, nw, xs, nx, dots);
#ifdef Q3N_VNNI
    if (w->bits == 8 && q8_integer(w)) return q8_tile(w, r0, nw, xs, nx, dots);
    if (w->bits == 4 && q4_integer(w)) return q4_tile(w, r0, nw, xs, nx, dots);
#elif defined(Q3N_AVX2_DOTS)
    if (w->bits == 8 && q8_integer(w)) return q8_rows_avx2(w, r0, nw, xs, nx, dots);
    if (w->bits == 4 && q4_integer(w)) return q4_tile_avx2(w, r0, nw, xs, nx, dots);
#endif
    for (int64_t m = 0; m < nx; m++)
        for (int i = 0; i < nw; i++)
            dots[m * TILE_W + i] = w->bits == 8 ? q8_row_dot(w, r0 + i, xs[m]) : q4_row_dot(w, r0 + i, xs[m]);
}

static inline int64_t tiles_of(int64_t rows) { return (rows + TILE_W - 1) / TILE_W; }
static inline int tile_width(const matrix *w, int64_t tile) {
    return (int)(w->rows - tile * TILE_W < TILE_W ? w->rows - tile * TILE_W : TILE_W);
}
static inline int64_t sums_group(const matrix *w) { return w->bits == 4 ? w->group : 0; }

/* 1 where the integer tiles are built in: only then do many rows beat dequantizing for a GEMM (quant/modules.py). */
int q3n_integer_tiles(void) {
#if defined(Q3N_VNNI) || defined(Q3N_AVX2_DOTS)
    return 1;
#else
    return 0;
#endif
}

/* ---- dense matrices: y [rows_x, out] = x [rows_x, in] @ W.T, any number of rows ---- */

/* A decode step makes about a hundred calls, one OpenMP region each, and a barrier between threads costs
 * about as much as a small matrix's arithmetic, so a call has as few as it can: up to Q3N_MAX_ROWS
 * activation rows are prepared before the region (one thread would prepare while the others waited), the
 * region's only barrier is its end, and a matrix of fewer tiles than threads runs on that many. */
static inline int few_rows(int64_t rows_x) { return rows_x <= Q3N_MAX_ROWS; }

/* xs[m] = rows m of x [rows_x, n], split across the threads when called inside a parallel region, and on
 * the calling thread alone when called before one (an orphaned worksharing loop). */
static void prepare_rows(prepared *xs, const uint16_t *x, int64_t rows_x, int64_t n, int64_t group, int forms) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < rows_x; m++) prepare_bf16(&xs[m], x + m * n, n, group, forms);
}

/* ys[i] [rows_x, ws[i].rows] = x [rows_x, in] @ ws[i].T for `count` matrices of one input in one region, their
 * tiles laid end to end; the 4-bit ones share their group (x's group sums serve them all). */
static void linear_many(const matrix *ws, int count, const uint16_t *x, void *const *ys, int64_t rows_x, int f32_out,
                        int threads) {
    prepared *xs = malloc(sizeof(prepared) * (size_t)rows_x);
    const prepared **px = malloc(sizeof(prepared *) * (size_t)rows_x);
    int64_t tiles = 0, group = 0, first_tile[count + 1];
    int forms = 0;
    for (int i = 0; i < count; i++) {
        first_tile[i] = tiles, tiles += tiles_of(ws[i].rows), forms |= forms_of(&ws[i]);
        group = sums_group(&ws[i]) ? sums_group(&ws[i]) : group;
    }
    first_tile[count] = tiles;
    const int64_t in = ws[0].cols;
    const int ahead = few_rows(rows_x);
    for (int64_t m = 0; m < rows_x; m++) px[m] = &xs[m];
    if (ahead) prepare_rows(xs, x, rows_x, in, group, forms);
#pragma omp parallel num_threads(team_for(tiles, threads))
    {
        if (!ahead) prepare_rows(xs, x, rows_x, in, group, forms);
        float dots[X_ROWS * TILE_W];
        /* activation rows X_ROWS at a time, so that their codes stay in cache while every weight tile passes;
         * the blocks write apart and a thread takes the same tiles in each */
        for (int64_t m0 = 0; m0 < rows_x; m0 += X_ROWS) {
            const int64_t nx = rows_x - m0 < X_ROWS ? rows_x - m0 : X_ROWS;
#pragma omp for schedule(static) nowait
            for (int64_t flat = 0; flat < tiles; flat++) {
                int i = 0;
                while (flat >= first_tile[i + 1]) i++;
                const matrix *w = &ws[i];
                const int64_t t = flat - first_tile[i];
                const int nw = tile_width(w, t);
                tile_dots(w, t * TILE_W, nw, px + m0, nx, dots);
                for (int64_t m = 0; m < nx; m++)
                    for (int j = 0; j < nw; j++)
                        store_output(ys[i], (m0 + m) * w->rows + t * TILE_W + j, dots[m * TILE_W + j], f32_out);
            }
        }
    }
    for (int64_t m = 0; m < rows_x; m++) release(&xs[m]);
    free(px);
    free(xs);
}

static void linear_quant(const matrix *w, const uint16_t *x, void *y, int64_t rows_x, int f32_out, int threads) {
    void *const ys[1] = {y};
    linear_many(w, 1, x, ys, rows_x, f32_out, threads);
}

/* int8 weights q [out, in] with one fp32 scale per row; y in bf16, or in fp32 with f32_out. */
void q3n_linear_q8(const int8_t *q, const float *scale, const uint16_t *x, void *y, int64_t rows_x, int64_t out,
                   int64_t in, int f32_out, int threads) {
    const matrix w = {8, out, in, in, (const uint8_t *)q, scale, NULL};
    linear_quant(&w, x, y, rows_x, f32_out, threads);
}

/* 4-bit weights: packed [out, in / 2], scale and minimum [out, in / group] (fp16); y as in q3n_linear_q8. */
void q3n_linear_q4(const uint8_t *packed, const uint16_t *scale, const uint16_t *minimum, int64_t group,
                   const uint16_t *x, void *y, int64_t rows_x, int64_t out, int64_t in, int f32_out, int threads) {
    const matrix w = {4, out, in, group, packed, scale, minimum};
    linear_quant(&w, x, y, rows_x, f32_out, threads);
}

/* Rows ids [n] of a quantized table [rows, cols] (an embedding) into out [n, cols] bf16, as quant/int8.py's and
 * int4.py's dequantize compute them: the code times its scale in fp32 (exact for 4-bit codes and fp16 scales, so
 * adding the minimum rounds once whether or not the compiler fuses the two), rounded to bf16. A decode step looks
 * up one row; through torch that was a dozen small ops, ~45 us of a hidden-512 model's 2 ms step
 * (docs/kernels.md). Returns the first out-of-range id's position, or -1. */
int64_t q3n_embed_quant(int64_t bits, const uint8_t *codes, const void *scale, const uint16_t *minimum, int64_t group,
                        int64_t rows, int64_t cols, const int64_t *ids, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= rows) return i;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = ids[i];
        uint16_t *y = out + i * cols;
        if (bits == 8) {
            const int8_t *q = (const int8_t *)codes + r * cols;
            const float s = ((const float *)scale)[r];
            for (int64_t c = 0; c < cols; c++) y[c] = f32_to_bf16((float)q[c] * s);
        } else {
            const uint8_t *q = codes + r * (cols / 2);
            const uint16_t *s = (const uint16_t *)scale + r * (cols / group), *m = minimum + r * (cols / group);
            for (int64_t c = 0; c < cols; c++) {
                const float code = (float)((q[c / 2] >> (4 * (c & 1))) & 0xF);
                y[c] = f32_to_bf16(code * f16_to_f32(s[c / group]) + f16_to_f32(m[c / group]));
            }
        }
    }
    return -1;
}

/* Several quantized matrices (q3n_matrix, bits 8 or 4; the 4-bit ones of one group) on one input x [rows_x, in]:
 * ys[i] [rows_x, ms[i].rows] in bf16, in one parallel region instead of one each (layer_kernels.c's project_many). */
void q3n_linear_quant_many(const q3n_matrix *ms, int count, const uint16_t *x, uint16_t *const *ys, int64_t rows_x,
                           int threads) {
    matrix ws[count];
    for (int i = 0; i < count; i++) {
        const matrix w = {ms[i].bits, ms[i].rows, ms[i].cols, ms[i].group, ms[i].codes, ms[i].scale, ms[i].minimum};
        ws[i] = w;
    }
    linear_many(ws, count, x, (void *const *)ys, rows_x, 0, threads);
}

/* ---- routed experts packed one blob each (quant/layout.py) ---- */

/* q3n_projection and q3n_expert_layout (common.h) say where each projection lives in a blob. */
Q3N_EXPORT_SIZEOF(q3n_projection)
Q3N_EXPORT_SIZEOF(q3n_expert_layout)

static int projection_forms(const q3n_projection *p) {
    const matrix w = {p->bits, p->rows, p->cols, p->group, NULL, NULL, NULL};
    return forms_of(&w);
}

/* Projection p of the expert whose row of the address table is `addresses`. */
static matrix projection_in(const int64_t *addresses, const q3n_projection *p) {
    const uint8_t *base = (const uint8_t *)(intptr_t)addresses[p->piece];
    const matrix w = {p->bits, p->rows, p->cols, p->group, base + p->codes, p->bits == 16 ? NULL : base + p->scale,
                      p->bits == 4 ? (const uint16_t *)(base + p->minimum) : NULL};
    return w;
}

/* The pairs sorted by expert (then by pair index), and where each expert's run of them starts. */
typedef struct {
    int64_t *order, *starts, *experts, count; /* starts[count] = pairs */
} by_expert;

static int compare_pairs(const void *a, const void *b) {
    const int64_t *x = a, *y = b;
    return x[0] != y[0] ? (x[0] < y[0] ? -1 : 1) : (x[1] < y[1] ? -1 : x[1] > y[1]);
}

static by_expert group_pairs(const int64_t *ids, int64_t pairs) {
    int64_t *keyed = malloc(sizeof(int64_t) * (size_t)(2 * pairs));
    for (int64_t p = 0; p < pairs; p++) keyed[2 * p] = ids[p], keyed[2 * p + 1] = p;
    qsort(keyed, (size_t)pairs, 2 * sizeof(int64_t), compare_pairs);
    by_expert g = {malloc(sizeof(int64_t) * (size_t)(3 * pairs + 1)), NULL, NULL, 0};
    g.starts = g.order + pairs, g.experts = g.starts + pairs + 1;
    for (int64_t j = 0; j < pairs; j++) {
        g.order[j] = keyed[2 * j + 1];
        if (j == 0 || keyed[2 * j] != keyed[2 * j - 2]) g.experts[g.count] = keyed[2 * j], g.starts[g.count++] = j;
    }
    g.starts[g.count] = pairs;
    free(keyed);
    return g;
}

#define ITEM_READ_COST 4 /* a tile's weight reads, in units of one activation row's arithmetic on the tile */

/* This thread's contiguous run [first, last) of the items (expert s, tile t) = s * tiles + t, balanced by
 * cost (the expert's rows plus the reads). Contiguous, so the prefetches a tile issues into the next
 * tile's rows serve this thread's own next item: handing items out round robin had each thread prefetch
 * its neighbour's tiles and start every one of its own cold (4-bit decode ran 1.2-1.5x slower). */
static void share_of_items(const by_expert *g, int64_t tiles, int64_t *first, int64_t *last) {
    const int64_t thread = omp_get_thread_num(), threads = omp_get_num_threads();
    int64_t total = 0;
    for (int64_t s = 0; s < g->count; s++) total += tiles * (g->starts[s + 1] - g->starts[s] + ITEM_READ_COST);
    const int64_t from = total * thread / threads, to = total * (thread + 1) / threads;
    /* an item belongs to the thread whose cost range holds the cost before it */
    int64_t before = 0, item = 0;
    *first = *last = -1;
    for (int64_t s = 0; s < g->count; s++) {
        const int64_t cost = g->starts[s + 1] - g->starts[s] + ITEM_READ_COST;
        for (int64_t t = 0; t < tiles; t++, item++, before += cost) {
            if (*first < 0 && before >= from) *first = item;
            if (*last < 0 && before >= to) *last = item;
        }
    }
    if (*first < 0) *first = item;
    if (*last < 0) *last = item;
}

/* pair_out [pairs, hidden] (fp32) = down(silu(gate x) * up x) for each pair p: token row tokens[p] of
 * x [rows_x, hidden] through expert ids[p], whose projections the layout finds from row ids[p] of the
 * address table [experts, layout->pieces] (quantized blobs or bf16 matrices). Each expert runs once on all
 * its pairs; its activations are rounded to bf16 as the reference's bf16 matmuls round them. gate and up
 * must share a 4-bit group size when both are 4-bit (the caller checks). */
void q3n_experts_pairs(const int64_t *table, const q3n_expert_layout *layout, const int64_t *ids,
                       const int64_t *tokens, int64_t pairs, const uint16_t *x, int64_t rows_x, float *pair_out,
                       int threads) {
    const int64_t hidden = layout->gate.cols, inter = layout->gate.rows;
    const int64_t x_group = layout->gate.bits == 4 ? layout->gate.group : layout->up.bits == 4 ? layout->up.group : 0;
    const int64_t act_group = layout->down.bits == 4 ? layout->down.group : 0;
    const int x_forms = projection_forms(&layout->gate) | projection_forms(&layout->up);
    const int act_forms = projection_forms(&layout->down);
    by_expert g = group_pairs(ids, pairs);
    prepared *xs = malloc(sizeof(prepared) * (size_t)(rows_x + pairs)), *acts_p = xs + rows_x;
    const prepared **px = malloc(sizeof(prepared *) * (size_t)(2 * pairs)), **pa = px + pairs;
    float *acts = malloc(sizeof(float) * (size_t)(pairs * inter));
    int64_t longest = 0;
    for (int64_t s = 0; s < g.count; s++) longest = g.starts[s + 1] - g.starts[s] > longest ? g.starts[s + 1] - g.starts[s] : longest;
    const int64_t up_tiles = tiles_of(inter), down_tiles = tiles_of(hidden);
    const int ahead = few_rows(rows_x); /* as linear_quant: the region's barriers are the ones the data needs */
    for (int64_t j = 0; j < pairs; j++) px[j] = &xs[tokens[g.order[j]]], pa[j] = &acts_p[g.order[j]];
    if (ahead) prepare_rows(xs, x, rows_x, hidden, x_group, x_forms);
#pragma omp parallel num_threads(threads)
    {
        if (!ahead) prepare_rows(xs, x, rows_x, hidden, x_group, x_forms);
        float *gates = malloc(sizeof(float) * (size_t)(2 * longest * TILE_W)), *ups = gates + longest * TILE_W;
        int64_t first, last;
        share_of_items(&g, up_tiles, &first, &last);
        for (int64_t item = first; item < last; item++) {
            const int64_t s = item / up_tiles, t = item % up_tiles, start = g.starts[s], nx = g.starts[s + 1] - start;
            const int64_t *addresses = table + g.experts[s] * layout->pieces;
            const matrix gate = projection_in(addresses, &layout->gate), up = projection_in(addresses, &layout->up);
            const int nw = tile_width(&gate, t);
            tile_dots(&gate, t * TILE_W, nw, px + start, nx, gates);
            tile_dots(&up, t * TILE_W, nw, px + start, nx, ups);
            for (int64_t m = 0; m < nx; m++)
                for (int i = 0; i < nw; i++) {
                    float gv = round_bf16(gates[m * TILE_W + i]), uv = round_bf16(ups[m * TILE_W + i]);
                    acts[g.order[start + m] * inter + t * TILE_W + i] = round_bf16(round_bf16(silu(gv)) * uv);
                }
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t p = 0; p < pairs; p++) prepare(&acts_p[p], acts + p * inter, inter, act_group, act_forms);
        share_of_items(&g, down_tiles, &first, &last);
        for (int64_t item = first; item < last; item++) {
            const int64_t s = item / down_tiles, t = item % down_tiles, start = g.starts[s], nx = g.starts[s + 1] - start;
            const matrix down = projection_in(table + g.experts[s] * layout->pieces, &layout->down);
            const int nw = tile_width(&down, t);
            tile_dots(&down, t * TILE_W, nw, pa + start, nx, gates);
            for (int64_t m = 0; m < nx; m++)
                for (int i = 0; i < nw; i++) pair_out[g.order[start + m] * hidden + t * TILE_W + i] = gates[m * TILE_W + i];
        }
        free(gates);
    }
    for (int64_t m = 0; m < rows_x + pairs; m++) release(&xs[m]);
    free(acts);
    free(px);
    free(xs);
    free(g.order);
}

/* out [n, hidden] (bf16) = sum_i weights[t, i] * pair_out[t * k + i] in the router's order i, in fp32. */
void q3n_experts_combine(const float *pair_out, const float *weights, int64_t n, int64_t k, int64_t hidden,
                         uint16_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < n * hidden; j++) {
        const int64_t t = j / hidden, r = j % hidden;
        float sum = 0.0f;
        for (int64_t i = 0; i < k; i++) sum += weights[t * k + i] * pair_out[(t * k + i) * hidden + r];
        out[j] = f32_to_bf16(sum);
    }
}

/* out [n, hidden] = sum_i weights[t, i] * expert_{ids[t, i]}(x[t]): q3n_experts_pairs, then
 * q3n_experts_combine (the two halves a caller that acquires experts a few at a time runs itself). */
void q3n_experts_quant(const int64_t *table, const q3n_expert_layout *layout, const int64_t *ids,
                       const float *weights, int64_t n, int64_t k, const uint16_t *x, uint16_t *out, int threads) {
    const int64_t hidden = layout->gate.cols;
    int64_t *tokens = malloc(sizeof(int64_t) * (size_t)(n * k));
    float *pair_out = malloc(sizeof(float) * (size_t)(n * k * hidden));
    for (int64_t p = 0; p < n * k; p++) tokens[p] = p / k;
    q3n_experts_pairs(table, layout, ids, tokens, n * k, x, n, pair_out, threads);
    q3n_experts_combine(pair_out, weights, n, k, hidden, out, threads);
    free(pair_out);
    free(tokens);
}
