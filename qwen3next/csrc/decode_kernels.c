/* Decode-time CPU kernels for bf16 weights: matrix-vector products that run at memory bandwidth.
 *
 * At decode a linear layer multiplies a weight matrix by one (or a few) activation rows, so its
 * cost is reading the weights once. PyTorch's bf16 path (oneDNN) reaches about a third of the
 * machine's read bandwidth on these shapes; a plain loop that widens bf16 to fp32 and lets the
 * compiler vectorise the multiply-add reaches most of it (docs/performance.md has the figures).
 * Activations are widened to fp32 once per call and accumulated in fp32; outputs are rounded to
 * bf16 (round to nearest even), as a bf16 GEMM with fp32 accumulation would.
 *
 * Built at first use with the system C compiler (qwen3next/cpu_kernels.py) and called through
 * ctypes with raw pointers; the Python side checks dtypes, shapes and contiguity.
 */
#include "common.h"

/* y[m, r] = sum_c w[r, c] * x[m, c] for m < rows_x: w [out, in], x [rows_x, in], y [rows_x, out]. */
void q3n_linear_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t rows_x, int64_t out, int64_t in,
                     int threads) {
    float *xf = widen(x, rows_x * in);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < out; r++) {
        const uint16_t *row = w + r * in;
        for (int64_t m = 0; m < rows_x; m++) y[m * out + r] = f32_to_bf16(dot_bf16_f32(row, xf + m * in, in));
    }
    free(xf);
}

#define Q3N_MAX_CONV_KERNEL 8 /* the Python side routes longer convs to torch */

/* One token through k SwiGLU experts, summed with weights:
 *   out = sum_e weights[e] * down_e(silu(gate_e x) * up_e x)
 * table[3 * id + {0, 1, 2}] holds the addresses of expert id's gate [inter, hidden], up [inter, hidden]
 * and down [hidden, inter] matrices; ids [k] pick the experts. */
void q3n_swiglu_experts_bf16(const int64_t *table, const int64_t *ids, const float *weights, int64_t k,
                             const uint16_t *x, uint16_t *out, int64_t hidden, int64_t inter, int threads) {
    float *xf = widen(x, hidden);
    float *act = malloc(sizeof(float) * (size_t)(k * inter));
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t j = 0; j < k * inter; j++) {
            const int64_t *e = table + 3 * ids[j / inter];
            int64_t r = j % inter;
            float g = dot_bf16_f32((const uint16_t *)(intptr_t)e[0] + r * hidden, xf, hidden);
            float u = dot_bf16_f32((const uint16_t *)(intptr_t)e[1] + r * hidden, xf, hidden);
            act[j] = silu(g) * u;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < hidden; r++) {
            float acc = 0.0f;
            for (int64_t i = 0; i < k; i++) {
                const uint16_t *down = (const uint16_t *)(intptr_t)table[3 * ids[i] + 2];
                acc += weights[i] * dot_bf16_f32(down + r * inter, act + i * inter, inter);
            }
            out[r] = f32_to_bf16(acc);
        }
    }
    free(act);
    free(xf);
}

/* Choose the top_k largest logits (the lower id wins a tie) and their routing weights: the softmax
 * over all experts renormalised over the chosen ones (norm_topk), or not. Weights are rounded to
 * bf16 as the reference casts them. */
static void route_top_k(const float *logits, int64_t experts, int64_t top_k, int norm_topk, int64_t *ids,
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

/* The weights of a sparse MoE block, as the decode kernels read them. */
typedef struct {
    const uint16_t *router;     /* [experts, hidden] */
    int64_t experts, top_k, norm_topk;
    const int64_t *table;       /* [experts, 3] addresses of each expert's gate, up, down */
    int64_t inter;
    const uint16_t *shared_gate, *shared_up, *shared_down; /* [shared_inter, hidden] x2, [hidden, shared_inter] */
    int64_t shared_inter;
    const uint16_t *shared_expert_gate; /* [1, hidden] */
} q3n_moe_weights;

/* A whole sparse MoE block for one token: router, top-k routed SwiGLU experts and the shared expert
 * scaled by sigmoid(shared_expert_gate x). Writes the block output and, for router statistics, the
 * chosen ids, their weights and the router logits. */
void q3n_moe_block_bf16(const uint16_t *x, uint16_t *out, const q3n_moe_weights *m, int64_t hidden, int64_t *ids,
                        float *weights, float *logits, int threads) {
    const int64_t top_k = m->top_k, inter = m->inter, shared_inter = m->shared_inter;
    float *xf = widen(x, hidden);
    float *act = malloc(sizeof(float) * (size_t)(top_k * inter + shared_inter));
    float *shared_act = act + top_k * inter, gate_logit = 0.0f;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t e = 0; e <= m->experts; e++) {
            if (e < m->experts) logits[e] = round_bf16(dot_bf16_f32(m->router + e * hidden, xf, hidden));
            else gate_logit = round_bf16(dot_bf16_f32(m->shared_expert_gate, xf, hidden));
        }
#pragma omp single
        route_top_k(logits, m->experts, top_k, (int)m->norm_topk, ids, weights);
#pragma omp for schedule(static)
        for (int64_t j = 0; j < top_k * inter + shared_inter; j++) {
            const uint16_t *gate, *up;
            int64_t r;
            if (j < top_k * inter) {
                const int64_t *e = m->table + 3 * ids[j / inter];
                r = j % inter;
                gate = (const uint16_t *)(intptr_t)e[0], up = (const uint16_t *)(intptr_t)e[1];
            } else {
                r = j - top_k * inter;
                gate = m->shared_gate, up = m->shared_up;
            }
            act[j] = silu(dot_bf16_f32(gate + r * hidden, xf, hidden)) * dot_bf16_f32(up + r * hidden, xf, hidden);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < hidden; r++) {
            float routed = 0.0f;
            for (int64_t i = 0; i < top_k; i++) {
                const uint16_t *down = (const uint16_t *)(intptr_t)m->table[3 * ids[i] + 2];
                routed += weights[i] * dot_bf16_f32(down + r * inter, act + i * inter, inter);
            }
            float shared = round_bf16(dot_bf16_f32(m->shared_down + r * shared_inter, shared_act, shared_inter));
            float scale = round_bf16(1.0f / (1.0f + expf(-gate_logit)));
            out[r] = f32_to_bf16(round_bf16(routed) + round_bf16(scale * shared));
        }
    }
    free(act);
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
 * activation dtype. */
void q3n_gated_delta_bf16(const uint16_t *qkvz, const uint16_t *ba, const uint16_t *conv_weight,
                          uint16_t *conv_state, const uint16_t *A_log, const uint16_t *dt_bias,
                          const uint16_t *norm_weight, float *state, uint16_t *out, int64_t tokens, int64_t k_heads,
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
            }
        }
    }
    free(mixed);
}

