/* Decode-time CPU kernels for bf16 weights: matrix-vector products that run at memory bandwidth.
 *
 * At decode a linear layer multiplies a weight matrix by one (or a few) activation rows, so its
 * cost is reading the weights once. PyTorch's bf16 path (oneDNN) reaches about a third of the
 * machine's read bandwidth on these shapes; a plain loop that widens bf16 to fp32 and lets the
 * compiler vectorise the multiply-add reaches most of it (docs/performance.md has the figures).
 * Activations are widened to fp32 once per call and accumulated in fp32; outputs are rounded to
 * bf16 (round to nearest even), as a bf16 GEMM with fp32 accumulation would (except logits, which
 * q3n_linear_bf16 can return in fp32).
 *
 * Built at first use with the system C compiler (qwen3next/cpu_kernels.py) and called through
 * ctypes with raw pointers; the Python side checks dtypes, shapes and contiguity.
 */
#include "common.h"

/* w[:n] . x[:n] with fp32 accumulation, for the expert, router and linear kernels.
 *
 * dot_bf16_f32 leaves the vectorisation to the compiler, which keeps one or two vector
 * accumulators and ends every row with a serial scalar sum over their lanes (32 dependent adds
 * with AVX-512). On the experts' short rows (128 to 512 columns on the benchmark model) that chain,
 * not memory, set the pace, and the two vCPUs of a small cloud machine are often the two
 * hyperthreads of one core, sharing one set of vector units, so a second thread did not help.
 * Four accumulators and a tree reduction make a row cost little more than its loads. Rows are
 * still read one at a time, front to back: computing four rows at once (sharing the loads of x)
 * measured slower from memory, presumably as four interleaved streams defeat the hardware
 * prefetcher. The sums differ from dot_bf16_f32's only in fp32 summation order. */
static inline float dot_row_bf16(const uint16_t *w, const float *x, int64_t n) {
#if defined(Q3N_AVX512)
#define Q3N_WIDEN(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        a0 = _mm512_fmadd_ps(Q3N_WIDEN(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(Q3N_WIDEN(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
        a2 = _mm512_fmadd_ps(Q3N_WIDEN(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
        a3 = _mm512_fmadd_ps(Q3N_WIDEN(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
    }
    for (; i + 16 <= n; i += 16) a0 = _mm512_fmadd_ps(Q3N_WIDEN(w + i), _mm512_loadu_ps(x + i), a0);
    if (i < n) { /* the last n % 16 columns: masked-off lanes load as zero */
        const __mmask16 mask = (__mmask16)((1u << (n - i)) - 1);
        __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, w + i)), 16));
        a1 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + i), a1);
    }
#undef Q3N_WIDEN
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(Q3N_AVX2)
#define Q3N_WIDEN(p) widen8_bf16(p)
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(Q3N_WIDEN(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(Q3N_WIDEN(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(Q3N_WIDEN(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(Q3N_WIDEN(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(Q3N_WIDEN(w + i), _mm256_loadu_ps(x + i), a0);
#undef Q3N_WIDEN
    __m256 v = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float acc = _mm_cvtss_f32(h);
    for (; i < n; i++) acc += bf16_to_f32(w[i]) * x[i];
    return acc;
#else
    return dot_bf16_f32(w, x, n);
#endif
}

/* out[m] = dot_row_bf16(w, x + m * stride, n) for m < count (at most 4), bit for bit: each row keeps
 * dot_row_bf16's accumulators and order, but the rows share each widened chunk of w and their
 * independent chains overlap, so a few rows cost little more than one on short matrices (where one
 * row's chain of dependent multiply-adds, not memory, sets the pace). */
static inline __attribute__((always_inline)) void dot_rows_upto4(const uint16_t *w, const float *x, int64_t stride,
                                                                 const int count, int64_t n, float *out) {
#if defined(Q3N_AVX512)
#define Q3N_WIDEN(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
    __m512 a0[4], a1[4], a2[4], a3[4];
    for (int m = 0; m < count; m++) a0[m] = a1[m] = a2[m] = a3[m] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        const __m512 w0 = Q3N_WIDEN(w + i), w1 = Q3N_WIDEN(w + i + 16), w2 = Q3N_WIDEN(w + i + 32), w3 = Q3N_WIDEN(w + i + 48);
        for (int m = 0; m < count; m++) {
            const float *xm = x + m * stride + i;
            a0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), a0[m]);
            a1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), a1[m]);
            a2[m] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xm + 32), a2[m]);
            a3[m] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xm + 48), a3[m]);
        }
    }
    for (; i + 16 <= n; i += 16) {
        const __m512 w0 = Q3N_WIDEN(w + i);
        for (int m = 0; m < count; m++) a0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * stride + i), a0[m]);
    }
    if (i < n) {
        const __mmask16 mask = (__mmask16)((1u << (n - i)) - 1);
        __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, w + i)), 16));
        for (int m = 0; m < count; m++) a1[m] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + m * stride + i), a1[m]);
    }
#undef Q3N_WIDEN
    for (int m = 0; m < count; m++)
        out[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0[m], a1[m]), _mm512_add_ps(a2[m], a3[m])));
#elif defined(Q3N_AVX2)
#define Q3N_WIDEN(p) widen8_bf16(p)
    __m256 a0[4], a1[4], a2[4], a3[4];
    for (int m = 0; m < count; m++) a0[m] = a1[m] = a2[m] = a3[m] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m256 w0 = Q3N_WIDEN(w + i), w1 = Q3N_WIDEN(w + i + 8), w2 = Q3N_WIDEN(w + i + 16), w3 = Q3N_WIDEN(w + i + 24);
        for (int m = 0; m < count; m++) {
            const float *xm = x + m * stride + i;
            a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), a0[m]);
            a1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), a1[m]);
            a2[m] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), a2[m]);
            a3[m] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), a3[m]);
        }
    }
    for (; i + 8 <= n; i += 8) {
        const __m256 w0 = Q3N_WIDEN(w + i);
        for (int m = 0; m < count; m++) a0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * stride + i), a0[m]);
    }
#undef Q3N_WIDEN
    for (int m = 0; m < count; m++) {
        __m256 v = _mm256_add_ps(_mm256_add_ps(a0[m], a1[m]), _mm256_add_ps(a2[m], a3[m]));
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        float acc = _mm_cvtss_f32(h);
        for (int64_t j = i; j < n; j++) acc += bf16_to_f32(w[j]) * x[m * stride + j];
        out[m] = acc;
    }
#else
    for (int m = 0; m < count; m++) out[m] = dot_row_bf16(w, x + m * stride, n);
#endif
}

/* out[m] = dot_row_bf16(w, x + m * stride, n) for every m < rows, four rows at a time. */
static inline void dot_rows_bf16(const uint16_t *w, const float *x, int64_t stride, int64_t rows, int64_t n,
                                 float *out) {
    int64_t m = 0;
    for (; m + 4 <= rows; m += 4) dot_rows_upto4(w, x + m * stride, stride, 4, n, out + m);
    switch (rows - m) { /* constant counts, so each call unrolls its row loops */
    case 3: dot_rows_upto4(w, x + m * stride, stride, 3, n, out + m); break;
    case 2: dot_rows_upto4(w, x + m * stride, stride, 2, n, out + m); break;
    case 1: dot_rows_upto4(w, x + m * stride, stride, 1, n, out + m); break;
    default: break;
    }
}

/* This thread's contiguous part [begin, end) of [0, total). */
static inline void thread_share(int64_t total, int64_t *begin, int64_t *end) {
    const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
    *begin = total * t / n;
    *end = total * (t + 1) / n;
}

/* y[m, r] = sum_c w[r, c] * x[m, c] for m < rows_x: w [out, in], x [rows_x, in], y [rows_x, out] in bf16,
 * or in fp32 with f32_out. */
void q3n_linear_bf16(const uint16_t *w, const uint16_t *x, void *y, int64_t rows_x, int64_t out, int64_t in,
                     int f32_out, int threads) {
    float *xf = widen(x, rows_x * in);
#pragma omp parallel num_threads(team_for(out, threads))
    {
        float *sums = malloc(sizeof(float) * (size_t)rows_x);
#pragma omp for schedule(static) nowait
        for (int64_t r = 0; r < out; r++) {
            dot_rows_bf16(w + r * in, xf, in, rows_x, in, sums);
            for (int64_t m = 0; m < rows_x; m++) store_output(y, m * out + r, sums[m], f32_out);
        }
        free(sums);
    }
    free(xf);
}

/* One SwiGLU expert as the expert kernels see it: gate and up [inter, hidden], down [hidden, inter]. */
typedef struct {
    const uint16_t *gate, *up, *down;
    int64_t inter;
} q3n_expert;

/* experts[0..count) on one token x, split across the threads of a parallel region in two phases.
 * Gate/up: act = silu(gate x) * up x over all experts' rows, laid end to end (act holds each
 * expert's activations after the previous one's); each thread takes a contiguous run of those rows.
 * Down (after a barrier): each thread takes a slice of the hidden rows and walks every expert's
 * down matrix over it, one expert after another, so it reads each matrix as one contiguous run
 * instead of hopping between k matrices for every output row. */
typedef struct {
    const q3n_expert *experts;
    int64_t count, hidden;
    const float *x; /* [hidden] fp32 */
    float *act, *up; /* [sum of inter] each; up is scratch */
} q3n_expert_work;

/* Phase one; call from every thread of the region, then a barrier before expert_down. */
static void experts_gate_up(const q3n_expert_work *w) {
    int64_t total = 0, begin, end;
    for (int64_t i = 0; i < w->count; i++) total += w->experts[i].inter;
    thread_share(total, &begin, &end);
    const int64_t hidden = w->hidden;
    for (int64_t e = 0, first = 0; e < w->count; first += w->experts[e++].inter) {
        const q3n_expert *ex = &w->experts[e];
        const int64_t from = begin > first ? begin - first : 0, to = end - first < ex->inter ? end - first : ex->inter;
        for (int64_t r = from; r < to; r++) {
            w->act[first + r] = dot_row_bf16(ex->gate + r * hidden, w->x, hidden);
            w->up[first + r] = dot_row_bf16(ex->up + r * hidden, w->x, hidden);
        }
    }
#pragma omp simd /* apart from the dots so that expf vectorises (libmvec) */
    for (int64_t j = begin; j < end; j++) w->act[j] = silu(w->act[j]) * w->up[j];
}

/* Phase two for expert e: d[r] = down_e[r, :] . act_e for r in [begin, end). */
static void expert_down(const q3n_expert_work *w, int64_t e, int64_t begin, int64_t end, float *d) {
    const q3n_expert *ex = &w->experts[e];
    const float *act = w->act;
    for (int64_t i = 0; i < e; i++) act += w->experts[i].inter;
    for (int64_t r = begin; r < end; r++) d[r] = dot_row_bf16(ex->down + r * ex->inter, act, ex->inter);
}

/* One token through k SwiGLU experts, summed with weights:
 *   out = sum_e weights[e] * down_e(silu(gate_e x) * up_e x)
 * table[3 * id + {0, 1, 2}] holds the addresses of expert id's gate [inter, hidden], up [inter, hidden]
 * and down [hidden, inter] matrices; ids [k] pick the experts. */
void q3n_swiglu_experts_bf16(const int64_t *table, const int64_t *ids, const float *weights, int64_t k,
                             const uint16_t *x, uint16_t *out, int64_t hidden, int64_t inter, int threads) {
    q3n_expert *experts = malloc(sizeof(q3n_expert) * (size_t)(k ? k : 1));
    for (int64_t i = 0; i < k; i++) {
        const int64_t *e = table + 3 * ids[i];
        experts[i] = (q3n_expert){(const uint16_t *)(intptr_t)e[0], (const uint16_t *)(intptr_t)e[1],
                                  (const uint16_t *)(intptr_t)e[2], inter};
    }
    float *xf = widen(x, hidden), *scratch = malloc(sizeof(float) * (size_t)(2 * k * inter + 2 * hidden));
    const q3n_expert_work work = {experts, k, hidden, xf, scratch, scratch + k * inter};
    float *acc = scratch + 2 * k * inter, *d = acc + hidden;
#pragma omp parallel num_threads(threads)
    {
        experts_gate_up(&work);
#pragma omp barrier
        int64_t begin, end;
        thread_share(hidden, &begin, &end);
        for (int64_t r = begin; r < end; r++) acc[r] = 0.0f;
        for (int64_t i = 0; i < k; i++) { /* the sum in expert order, as one output row at a time had it */
            expert_down(&work, i, begin, end, d);
            for (int64_t r = begin; r < end; r++) acc[r] += weights[i] * d[r];
        }
        for (int64_t r = begin; r < end; r++) out[r] = f32_to_bf16(acc[r]);
    }
    free(scratch);
    free(xf);
    free(experts);
}

/* Choose the top_k largest logits (the lower id wins a tie) and their routing weights: the softmax
 * over all experts renormalised over the chosen ones (norm_topk), or not. Weights are rounded to
 * bf16 as the reference casts them. */
void q3n_route_top_k(const float *logits, int64_t experts, int64_t top_k, int norm_topk, int64_t *ids,
                     float *weights) {
    for (int64_t i = 0; i < top_k; i++) {
        int64_t best = -1;
        for (int64_t e = 0; e < experts; e++) {
            int taken = 0;
            for (int64_t j = 0; j < i; j++) taken |= ids[j] == e;
            if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
        }
        ids[i] = best;
    }
    float top = logits[ids[0]], total = 0.0f, chosen = 0.0f;
    for (int64_t e = 0; e < experts; e++) total += expf(logits[e] - top);
    for (int64_t i = 0; i < top_k; i++) chosen += (weights[i] = expf(logits[ids[i]] - top));
    for (int64_t i = 0; i < top_k; i++) weights[i] = round_bf16(weights[i] / (norm_topk ? chosen : total));
}

/* q3n_moe_weights (common.h): a sparse MoE block's bf16 weights, as the decode kernels read them. */
Q3N_EXPORT_SIZEOF(q3n_moe_weights)

/* A sparse MoE block for one token runs in three phases, each called from every thread of a parallel
 * region: the router's logits (and the shared expert's gate logit), the choice of experts (one thread),
 * and the experts themselves. The fused block runs all three in one region; an expert cache that must
 * make the chosen experts resident between choosing and computing runs them as two calls
 * (q3n_moe_route_bf16, then q3n_moe_experts_bf16). Both give the same bits: the experts phase is shared,
 * and the fused block's router (dot_rows_bf16, several tokens per weight row) gives each token
 * dot_row_bf16's sums, as moe_router_phase computes them. */
typedef struct {
    q3n_expert *experts; /* the chosen ones, then the shared one */
    float *xf, *scratch, *routed, *d;
    q3n_expert_work work;
} q3n_moe_scratch;

/* Scratch for one token at a time; xf (the token widened to fp32) stays the caller's. */
static q3n_moe_scratch moe_scratch(const q3n_moe_weights *m, float *xf, int64_t hidden) {
    const int64_t top_k = m->top_k, rows = top_k * m->inter + m->shared_inter;
    q3n_moe_scratch s;
    s.experts = malloc(sizeof(q3n_expert) * (size_t)(top_k + 1));
    s.experts[top_k] = (q3n_expert){m->shared_gate, m->shared_up, m->shared_down, m->shared_inter};
    s.xf = xf;
    s.scratch = malloc(sizeof(float) * (size_t)(2 * rows + 2 * hidden));
    s.routed = s.scratch + 2 * rows;
    s.d = s.routed + hidden;
    s.work = (q3n_expert_work){s.experts, top_k + 1, hidden, s.xf, s.scratch, s.scratch + rows};
    return s;
}

static void moe_scratch_free(q3n_moe_scratch *s) {
    free(s->scratch);
    free(s->experts);
}

/* Phase one: logits[e] = router_e . x, and the shared expert's gate logit, rounded to bf16 as the reference. */
static void moe_router_phase(const q3n_moe_weights *m, const float *xf, int64_t hidden, float *logits,
                             float *gate_logit) {
    int64_t begin, end;
    thread_share(m->experts + 1, &begin, &end); /* the router's rows, then the shared expert's gate */
    for (int64_t e = begin; e < end; e++) {
        if (e < m->experts) logits[e] = round_bf16(dot_row_bf16(m->router + e * hidden, xf, hidden));
        else *gate_logit = round_bf16(dot_row_bf16(m->shared_expert_gate, xf, hidden));
    }
}

/* Phase two (one thread): the chosen experts' matrices from the address table. */
static void moe_choose(const q3n_moe_weights *m, const int64_t *ids, q3n_expert *experts) {
    for (int64_t i = 0; i < m->top_k; i++) {
        const int64_t *e = m->table + 3 * ids[i];
        experts[i] = (q3n_expert){(const uint16_t *)(intptr_t)e[0], (const uint16_t *)(intptr_t)e[1],
                                  (const uint16_t *)(intptr_t)e[2], m->inter};
    }
}

/* Phase three: the routed sum in the router's order plus the gated shared expert. */
static void moe_experts_phase(const q3n_moe_weights *m, const q3n_moe_scratch *s, const float *weights,
                              float gate_logit, uint16_t *out) {
    const int64_t hidden = s->work.hidden;
    int64_t begin, end;
    experts_gate_up(&s->work);
#pragma omp barrier
    thread_share(hidden, &begin, &end);
    for (int64_t r = begin; r < end; r++) s->routed[r] = 0.0f;
    for (int64_t i = 0; i < m->top_k; i++) {
        expert_down(&s->work, i, begin, end, s->d);
        for (int64_t r = begin; r < end; r++) s->routed[r] += weights[i] * s->d[r];
    }
    expert_down(&s->work, m->top_k, begin, end, s->d);
    const float scale = round_bf16(1.0f / (1.0f + expf(-gate_logit)));
    for (int64_t r = begin; r < end; r++)
        out[r] = f32_to_bf16(round_bf16(s->routed[r]) + round_bf16(scale * round_bf16(s->d[r])));
}

/* A whole sparse MoE block for each of `tokens` (at most Q3N_MAX_ROWS) tokens: router, top-k routed SwiGLU
 * experts and the shared expert scaled by sigmoid(shared_expert_gate x). Writes the block outputs and, for
 * router statistics, the chosen ids, their weights and the router logits, a row per token. Each token gets
 * the bits it gets alone (a speculative verify pass relies on it): the router reads each weight row once for
 * all tokens (dot_rows_bf16, one-row bits), then the tokens' experts run one token after another.
 * tokens <= Q3N_MAX_ROWS (the stack buffers below): cpu_kernels.moe_block refuses more. */
void q3n_moe_block_bf16(const uint16_t *x, uint16_t *out, const q3n_moe_weights *m, int64_t hidden, int64_t tokens,
                        int64_t *ids, float *weights, float *logits, int threads) {
    float *xf = widen(x, tokens * hidden), gate_logits[Q3N_MAX_ROWS];
    q3n_moe_scratch s = moe_scratch(m, xf, hidden);
#pragma omp parallel num_threads(threads)
    {
        int64_t begin, end;
        float sums[Q3N_MAX_ROWS];
        thread_share(m->experts + 1, &begin, &end); /* the router's rows, then the shared expert's gate */
        for (int64_t e = begin; e < end; e++) {
            dot_rows_bf16(e < m->experts ? m->router + e * hidden : m->shared_expert_gate, xf, hidden, tokens, hidden,
                          sums);
            for (int64_t t = 0; t < tokens; t++) {
                if (e < m->experts) logits[t * m->experts + e] = round_bf16(sums[t]);
                else gate_logits[t] = round_bf16(sums[t]);
            }
        }
#pragma omp barrier
        for (int64_t t = 0; t < tokens; t++) {
#pragma omp single
            {
                q3n_route_top_k(logits + t * m->experts, m->experts, m->top_k, (int)m->norm_topk,
                                ids + t * m->top_k, weights + t * m->top_k);
                moe_choose(m, ids + t * m->top_k, s.experts);
                s.work.x = xf + t * hidden;
            } /* implicit barrier: every thread sees the chosen experts */
            moe_experts_phase(m, &s, weights + t * m->top_k, gate_logits[t], out + t * hidden);
#pragma omp barrier /* before the next token's experts replace these */
        }
    }
    moe_scratch_free(&s);
    free(xf);
}

/* The block's first half: the router's choice (ids, weights, logits) and the shared expert's gate logit. */
void q3n_moe_route_bf16(const uint16_t *x, const q3n_moe_weights *m, int64_t hidden, int64_t *ids, float *weights,
                        float *logits, float *gate_logit, int threads) {
    float *xf = widen(x, hidden);
#pragma omp parallel num_threads(threads)
    moe_router_phase(m, xf, hidden, logits, gate_logit);
    q3n_route_top_k(logits, m->experts, m->top_k, (int)m->norm_topk, ids, weights);
    free(xf);
}

/* The block's second half, once the chosen experts' table entries are valid. */
void q3n_moe_experts_bf16(const uint16_t *x, uint16_t *out, const q3n_moe_weights *m, int64_t hidden,
                          const int64_t *ids, const float *weights, float gate_logit, int threads) {
    float *xf = widen(x, hidden);
    q3n_moe_scratch s = moe_scratch(m, xf, hidden);
    moe_choose(m, ids, s.experts);
#pragma omp parallel num_threads(threads)
    moe_experts_phase(m, &s, weights, gate_logit, out);
    moe_scratch_free(&s);
    free(xf);
}

/* out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * (offset + w): offset 1 for the zero-centered norms. */
void q3n_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t rows, int64_t dim, float eps,
                       float offset) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * dim;
        float sum = 0.0f;
        for (int64_t i = 0; i < dim; i++) {
            float v = bf16_to_f32(xr[i]);
            sum += v * v;
        }
        float scale = 1.0f / sqrtf(sum / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++)
            out[r * dim + i] = f32_to_bf16(bf16_to_f32(xr[i]) * scale * (offset + bf16_to_f32(w[i])));
    }
}

/* Attention for one new query per head against `length` cached positions (grouped-query).
 * q, out: [kv_heads * group, dim]; key/value head h starts at k + h * head_stride (rows of dim). */
void q3n_attend_one_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t kv_heads,
                         int64_t group, int64_t length, int64_t dim, int64_t head_stride, float scale, int threads) {
#pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * (size_t)length);
        float *qf = malloc(sizeof(float) * (size_t)dim);
        float *acc = malloc(sizeof(float) * (size_t)dim);
#pragma omp for schedule(static)
        for (int64_t head = 0; head < kv_heads * group; head++) {
            const uint16_t *kh = k + (head / group) * head_stride, *vh = v + (head / group) * head_stride;
            for (int64_t i = 0; i < dim; i++) qf[i] = bf16_to_f32(q[head * dim + i]);
            float top = -INFINITY;
            for (int64_t t = 0; t < length; t++) {
                scores[t] = dot_bf16_f32(kh + t * dim, qf, dim) * scale;
                if (scores[t] > top) top = scores[t];
            }
            float total = 0.0f;
            for (int64_t t = 0; t < length; t++) total += (scores[t] = expf(scores[t] - top));
            for (int64_t i = 0; i < dim; i++) acc[i] = 0.0f;
            for (int64_t t = 0; t < length; t++) {
                float p = scores[t] / total;
                const uint16_t *row = vh + t * dim;
#pragma omp simd
                for (int64_t i = 0; i < dim; i++) acc[i] += p * bf16_to_f32(row[i]);
            }
            for (int64_t i = 0; i < dim; i++) out[head * dim + i] = f32_to_bf16(acc[i]);
        }
        free(acc);
        free(qf);
        free(scores);
    }
}

/* Tokens through the core of a Gated DeltaNet layer, from its fused projections to the gated norm.
 *
 * qkvz [tokens, k_heads, 2 dk + 2 r dv] and ba [tokens, k_heads, 2 r] are the projections in the
 * checkpoint's grouping by key head (r = v_heads / k_heads value heads per key head). The causal conv
 * runs over channels [q_all | k_all | v_all] (conv_weight [channels, kernel]; conv_state [channels,
 * kernel - 1] holds the inputs before the first token and is left holding the last ones); q and k are
 * l2-normalised (q also scaled by dk^-1/2); then per value head h, reading key head h / r, with the fp32
 * state S [dk, dv] (updated in place), token by token:
 *   S *= exp(g);  delta = beta (v - S^T k);  S += k delta^T;  o = S^T q
 * with beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias); finally out = rmsnorm(o) * norm_w * silu(z).
 * The recurrence costs tokens * v_heads * dk * dv multiply-adds, cheap enough on a CPU that this
 * sequential form also serves prefill. Intermediate roundings to bf16 follow the reference's
 * activation dtype.
 *
 * kept_state [tokens - 1, v_heads, dk, dv] and kept_conv [tokens - 1, channels, kernel - 1], when not NULL,
 * receive the states after each token but the last (the live states hold the last): a speculative verify
 * pass rolls back to any of its positions from them, written while each head's state is in cache. */
void q3n_gated_delta_bf16(const uint16_t *qkvz, const uint16_t *ba, const uint16_t *conv_weight,
                          uint16_t *conv_state, const uint16_t *A_log, const uint16_t *dt_bias,
                          const uint16_t *norm_weight, float *state, uint16_t *out, float *kept_state,
                          uint16_t *kept_conv, int64_t tokens, int64_t k_heads,
                          int64_t v_heads, int64_t dk, int64_t dv, int64_t kernel, float eps, int threads) {
    const int64_t r = v_heads / k_heads, group = 2 * dk + 2 * r * dv, key_total = k_heads * dk;
    const int64_t channels = 2 * key_total + v_heads * dv, row = k_heads * group, history = kernel - 1;
    float *mixed = malloc(sizeof(float) * (size_t)(tokens * channels));
#pragma omp parallel num_threads(threads)
    {
        /* causal conv + silu; each thread takes blocks of channels and walks the tokens in order, so
         * it reads each projection row contiguously and keeps its channels' history in registers/L1 */
        enum { BLOCK = 64 };
        float hist[Q3N_MAX_CONV_KERNEL * BLOCK], weight[Q3N_MAX_CONV_KERNEL * BLOCK];
        int64_t src[BLOCK];
#pragma omp for schedule(static)
        for (int64_t first = 0; first < channels; first += BLOCK) {
            const int64_t count = channels - first < BLOCK ? channels - first : BLOCK;
            for (int64_t b = 0; b < count; b++) {
                const int64_t c = first + b; /* where channel c sits in a grouped projection row */
                if (c < key_total) src[b] = (c / dk) * group + c % dk;
                else if (c < 2 * key_total) src[b] = ((c - key_total) / dk) * group + dk + (c - key_total) % dk;
                else {
                    int64_t vc = c - 2 * key_total, h = vc / dv;
                    src[b] = (h / r) * group + 2 * dk + (h % r) * dv + vc % dv;
                }
                for (int64_t j = 0; j < history; j++) hist[j * BLOCK + b] = bf16_to_f32(conv_state[c * history + j]);
                for (int64_t j = 0; j < kernel; j++) weight[j * BLOCK + b] = bf16_to_f32(conv_weight[c * kernel + j]);
            }
            for (int64_t t = 0; t < tokens; t++) {
                const uint16_t *in = qkvz + t * row;
                float *dst = mixed + t * channels + first;
                if (history == 3) { /* Qwen3-Next's kernel of 4, unrolled so the loop vectorises */
#pragma omp simd
                    for (int64_t b = 0; b < count; b++) {
                        float x0 = hist[b], x1 = hist[BLOCK + b], x2 = hist[2 * BLOCK + b];
                        float input = bf16_to_f32(in[src[b]]);
                        float acc = weight[b] * x0 + weight[BLOCK + b] * x1 + weight[2 * BLOCK + b] * x2 +
                                    weight[3 * BLOCK + b] * input;
                        hist[b] = x1;
                        hist[BLOCK + b] = x2;
                        hist[2 * BLOCK + b] = input;
                        dst[b] = round_bf16(silu(round_bf16(acc)));
                    }
                } else {
                    for (int64_t b = 0; b < count; b++) {
                        float input = bf16_to_f32(in[src[b]]);
                        float acc = weight[history * BLOCK + b] * input;
                        for (int64_t j = 0; j < history; j++) acc += weight[j * BLOCK + b] * hist[j * BLOCK + b];
                        for (int64_t j = 0; j + 1 < history; j++) hist[j * BLOCK + b] = hist[(j + 1) * BLOCK + b];
                        if (history > 0) hist[(history - 1) * BLOCK + b] = input;
                        dst[b] = round_bf16(silu(round_bf16(acc)));
                    }
                }
                if (kept_conv != NULL && t + 1 < tokens)
                    for (int64_t b = 0; b < count; b++)
                        for (int64_t j = 0; j < history; j++)
                            kept_conv[(t * channels + first + b) * history + j] = f32_to_bf16(hist[j * BLOCK + b]);
            }
            for (int64_t b = 0; b < count; b++)
                for (int64_t j = 0; j < history; j++)
                    conv_state[(first + b) * history + j] = f32_to_bf16(hist[j * BLOCK + b]);
        }
        /* l2-normalise q and k per key head (and scale q) */
#pragma omp for schedule(static)
        for (int64_t th = 0; th < tokens * 2 * k_heads; th++) {
            int64_t t = th / (2 * k_heads), h = th % (2 * k_heads);
            float *vec = mixed + t * channels + h * dk, sum = 0.0f;
            for (int64_t i = 0; i < dk; i++) sum += vec[i] * vec[i];
            float scale = 1.0f / sqrtf(sum + 1e-6f) * (h < k_heads ? 1.0f / sqrtf((float)dk) : 1.0f);
            for (int64_t i = 0; i < dk; i++) vec[i] *= scale;
        }
        /* the recurrence, one value head per iteration, tokens in order */
        float predicted[dv], o[dv];
#pragma omp for schedule(static)
        for (int64_t h = 0; h < v_heads; h++) {
            const int64_t kh = h / r, j = h % r;
            const float A = expf(bf16_to_f32(A_log[h])), bias = bf16_to_f32(dt_bias[h]);
            float *S = state + h * dk * dv;
            for (int64_t t = 0; t < tokens; t++) {
                const float *q = mixed + t * channels + kh * dk, *k = mixed + t * channels + key_total + kh * dk;
                const float *v = mixed + t * channels + 2 * key_total + h * dv;
                const uint16_t *ba_t = ba + t * 2 * v_heads + kh * 2 * r;
                float beta = round_bf16(1.0f / (1.0f + expf(-bf16_to_f32(ba_t[j]))));
                float x = bf16_to_f32(ba_t[r + j]) + bias;
                float decay = expf(-A * (x > 20.0f ? x : log1pf(expf(x))));
                for (int64_t m = 0; m < dv; m++) predicted[m] = 0.0f;
                for (int64_t i = 0; i < dk; i++) {
                    float *s_row = S + i * dv;
#pragma omp simd
                    for (int64_t m = 0; m < dv; m++) {
                        s_row[m] *= decay;
                        predicted[m] += s_row[m] * k[i];
                    }
                }
                for (int64_t m = 0; m < dv; m++) {
                    predicted[m] = beta * (v[m] - predicted[m]); /* now delta */
                    o[m] = 0.0f;
                }
                for (int64_t i = 0; i < dk; i++) {
                    float *s_row = S + i * dv;
#pragma omp simd
                    for (int64_t m = 0; m < dv; m++) {
                        s_row[m] += k[i] * predicted[m];
                        o[m] += s_row[m] * q[i];
                    }
                }
                /* gated RMSNorm with z, in the reference's order of roundings */
                const uint16_t *z = qkvz + t * row + kh * group + 2 * dk + r * dv + j * dv;
                float sum = 0.0f;
                for (int64_t m = 0; m < dv; m++) {
                    o[m] = round_bf16(o[m]);
                    sum += o[m] * o[m];
                }
                float scale = 1.0f / sqrtf(sum / (float)dv + eps);
                for (int64_t m = 0; m < dv; m++) {
                    float normed = round_bf16(round_bf16(o[m] * scale) * bf16_to_f32(norm_weight[m]));
                    out[t * v_heads * dv + h * dv + m] = f32_to_bf16(normed * silu(bf16_to_f32(z[m])));
                }
                if (kept_state != NULL && t + 1 < tokens)
                    memcpy(kept_state + (t * v_heads + h) * dk * dv, S, sizeof(float) * (size_t)(dk * dv));
            }
        }
    }
    free(mixed);
}

