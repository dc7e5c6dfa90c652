/* A decoder layer's token mixer as one call: input norm, the attention or Gated DeltaNet mixer, the
 * residual add and the post-attention norm, for a decode step (or a speculative verify pass of up to
 * Q3N_MAX_ROWS tokens, each computed as its own step would compute it).
 *
 * Why: on small models a decode step is dominated by per-op dispatch. The torch-module path of one
 * layer makes about ten kernel calls, each wrapped in Python checks and a tensor allocation; this
 * chains the same per-op kernels (common.h's prototypes) from C, with the same roundings to bf16 in
 * the same places, so the results are the module path's bits except where it calls torch for an
 * elementwise op (the attention gate's sigmoid uses libm's expf, torch SLEEF's: they may differ in the
 * last fp32 bit, which the bf16 rounding after it almost always hides). The MoE half of the layer stays
 * with the MoE block (moe.py), which knows where experts live; for quantized routed experts it calls the
 * q3n_moe_*_quant kernels at the end of this file (bf16 experts have decode_kernels.c's fused block).
 *
 * Matrices may be bf16 or the 8/4-bit formats (quant/int8.py, quant/int4.py); every kernel used here
 * computes each token's row alone, so a token's bits do not depend on how many share the call. */
#include "common.h"

Q3N_EXPORT_SIZEOF(q3n_matrix) /* common.h */

/* What every decoder layer has around its mixer: zero-centered RMSNorms before and after it. */
typedef struct {
    const uint16_t *input_norm, *post_norm; /* [hidden] */
    int64_t hidden;
    float eps;
} q3n_layer_norms;
Q3N_EXPORT_SIZEOF(q3n_layer_norms)

typedef struct {
    q3n_layer_norms norms;
    q3n_matrix qkvz, ba, out;
    const uint16_t *conv_weight, *A_log, *dt_bias, *norm_weight;
    int64_t k_heads, v_heads, dk, dv, kernel;
} q3n_deltanet_layer;
Q3N_EXPORT_SIZEOF(q3n_deltanet_layer)

typedef struct {
    q3n_layer_norms norms;
    q3n_matrix q, k, v, o; /* q emits [query_h | gate_h] per head */
    const uint16_t *q_norm, *k_norm; /* [head_dim], zero-centered */
    int64_t heads, kv_heads, head_dim, rotary_dim;
    float scale; /* head_dim^-1/2, as Python rounds it */
} q3n_attention_layer;
Q3N_EXPORT_SIZEOF(q3n_attention_layer)

/* y [tokens, m->rows] (bf16) = x [tokens, m->cols] @ W.T */
static void project(const q3n_matrix *m, const uint16_t *x, uint16_t *y, int64_t tokens, int threads) {
    if (m->bits == 16) q3n_linear_bf16(m->codes, x, y, tokens, m->rows, m->cols, 0, threads);
    else if (m->bits == 8) q3n_linear_q8(m->codes, m->scale, x, y, tokens, m->rows, m->cols, 0, threads);
    else q3n_linear_q4(m->codes, m->scale, m->minimum, m->group, x, y, tokens, m->rows, m->cols, 0, threads);
}

/* ys[i] = x @ W_i.T for matrices on one input (a layer's q, k and v; its two DeltaNet input projections; the
 * router, the shared expert's gate and its gate and up projections): the quantized ones in one parallel region
 * (q3n_linear_quant_many; the 4-bit ones of the first one's group), each other one in a call of its own. The
 * bits are the same either way. */
static void project_many(const q3n_matrix *ms, int count, const uint16_t *x, uint16_t *const *ys, int64_t tokens,
                         int threads) {
    q3n_matrix together[count];
    uint16_t *together_ys[count];
    int n = 0;
    int64_t group = 0; /* the 4-bit matrices' group, from the first of them */
    for (int i = 0; i < count; i++) {
        const int joins = ms[i].bits == 8 || (ms[i].bits == 4 && (!group || ms[i].group == group));
        if (ms[i].bits == 4 && !group) group = ms[i].group;
        if (joins) together[n] = ms[i], together_ys[n++] = ys[i];
        else project(&ms[i], x, ys[i], tokens, threads);
    }
    if (n == 1) project(&together[0], x, together_ys[0], tokens, threads);
    else if (n > 1) q3n_linear_quant_many(together, n, x, together_ys, tokens, threads);
}

/* out = x + mixed (bf16, rounded as torch's bf16 add), then normed = post_norm(out). */
static void residual_and_norm(const q3n_layer_norms *n, const uint16_t *x, const uint16_t *mixed, uint16_t *out,
                              uint16_t *normed, int64_t tokens) {
    for (int64_t i = 0; i < tokens * n->hidden; i++) out[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(mixed[i]));
    q3n_rms_norm_bf16(out, n->post_norm, normed, tokens, n->hidden, n->eps, 1.0f);
}

/* Gated DeltaNet mixer for `tokens` consecutive tokens: x [tokens, hidden] is the residual stream, out receives
 * it after the mixer and normed its post-attention norm. conv_state, state, kept_state and kept_conv as
 * q3n_gated_delta_bf16 takes them. */
void q3n_deltanet_layer_bf16(const q3n_deltanet_layer *L, const uint16_t *x, uint16_t *out, uint16_t *normed,
                             int64_t tokens,
                             uint16_t *conv_state, float *state, float *kept_state, uint16_t *kept_conv, int threads) {
    const int64_t hidden = L->norms.hidden, values = L->v_heads * L->dv;
    uint16_t *h = malloc(sizeof(uint16_t) * (size_t)(tokens * (2 * hidden + L->qkvz.rows + L->ba.rows + values)));
    uint16_t *qkvz = h + tokens * hidden, *ba = qkvz + tokens * L->qkvz.rows, *core = ba + tokens * L->ba.rows;
    uint16_t *mixed = core + tokens * values;
    q3n_rms_norm_bf16(x, L->norms.input_norm, h, tokens, hidden, L->norms.eps, 1.0f);
    const q3n_matrix inputs[2] = {L->qkvz, L->ba};
    project_many(inputs, 2, h, (uint16_t *const[]){qkvz, ba}, tokens, threads);
    q3n_gated_delta_bf16(qkvz, ba, L->conv_weight, conv_state, L->A_log, L->dt_bias, L->norm_weight, state, core,
                         kept_state, kept_conv, tokens, L->k_heads, L->v_heads, L->dk, L->dv, L->kernel, L->norms.eps,
                         threads);
    project(&L->out, core, mixed, tokens, threads);
    residual_and_norm(&L->norms, x, mixed, out, normed, tokens);
    free(h);
}

/* Rotate-half RoPE on the first rotary_dim of a head's dims, in place, rounded as torch's bf16 ops are:
 * each product, then their sum. */
static void rotate(uint16_t *head, const uint16_t *cos, const uint16_t *sin, int64_t rotary_dim) {
    const int64_t half = rotary_dim / 2;
    float rotated[rotary_dim];
    for (int64_t i = 0; i < rotary_dim; i++) {
        const float partner = bf16_to_f32(head[i < half ? i + half : i - half]);
        const float turned = round_bf16((i < half ? -partner : partner) * bf16_to_f32(sin[i]));
        rotated[i] = round_bf16(bf16_to_f32(head[i]) * bf16_to_f32(cos[i])) + turned;
    }
    for (int64_t i = 0; i < rotary_dim; i++) head[i] = f32_to_bf16(rotated[i]);
}

/* Gated attention mixer for `tokens` consecutive tokens at positions past, past + 1, ...: each token's key and
 * value are written into the cache (keys, values: [kv_heads, capacity, head_dim]) and its query attends
 * over the positions up to its own, as a one-token step would. cos, sin: [tokens, rotary_dim]; x, out and
 * normed as q3n_deltanet_layer_bf16 has them. */
void q3n_attention_layer_bf16(const q3n_attention_layer *L, const uint16_t *x, uint16_t *out, uint16_t *normed,
                              int64_t tokens,
                              const uint16_t *cos, const uint16_t *sin, uint16_t *keys, uint16_t *values,
                              int64_t past, int64_t capacity, int threads) {
    const int64_t hidden = L->norms.hidden, heads = L->heads, kv_heads = L->kv_heads, dim = L->head_dim;
    const int64_t inner = heads * dim, kv = kv_heads * dim;
    uint16_t *h = malloc(sizeof(uint16_t) * (size_t)(tokens * (2 * hidden + 2 * inner + 3 * kv + 2 * inner)));
    uint16_t *qg = h + tokens * hidden, *k = qg + tokens * 2 * inner, *v = k + tokens * kv;
    uint16_t *kn = v + tokens * kv, *query = kn + tokens * kv, *attended = query + tokens * inner;
    uint16_t *mixed = attended + tokens * inner;
    q3n_rms_norm_bf16(x, L->norms.input_norm, h, tokens, hidden, L->norms.eps, 1.0f);
    const q3n_matrix qkv[3] = {L->q, L->k, L->v};
    project_many(qkv, 3, h, (uint16_t *const[]){qg, k, v}, tokens, threads);
    q3n_rms_norm_bf16(k, L->k_norm, kn, tokens * kv_heads, dim, L->norms.eps, 1.0f);
    for (int64_t t = 0; t < tokens; t++) {
        const uint16_t *c = cos + t * L->rotary_dim, *s = sin + t * L->rotary_dim;
        for (int64_t head = 0; head < heads; head++) {
            uint16_t *qh = query + (t * heads + head) * dim;
            q3n_rms_norm_bf16(qg + (t * heads + head) * 2 * dim, L->q_norm, qh, 1, dim, L->norms.eps, 1.0f);
            rotate(qh, c, s, L->rotary_dim);
        }
        for (int64_t head = 0; head < kv_heads; head++) {
            uint16_t *kh = kn + (t * kv_heads + head) * dim;
            rotate(kh, c, s, L->rotary_dim);
            const int64_t slot = (head * capacity + past + t) * dim;
            memcpy(keys + slot, kh, sizeof(uint16_t) * (size_t)dim);
            memcpy(values + slot, v + (t * kv_heads + head) * dim, sizeof(uint16_t) * (size_t)dim);
        }
    }
    for (int64_t t = 0; t < tokens; t++) {
        uint16_t *a = attended + t * inner;
        q3n_attend_one_bf16(query + t * inner, keys, values, a, kv_heads, heads / kv_heads, past + t + 1, dim,
                            capacity * dim, L->scale, threads);
        for (int64_t head = 0; head < heads; head++)
            for (int64_t i = 0; i < dim; i++) {
                const float g = bf16_to_f32(qg[(t * heads + head) * 2 * dim + dim + i]);
                const float gate = round_bf16(1.0f / (1.0f + expf(-g)));
                a[head * dim + i] = f32_to_bf16(bf16_to_f32(a[head * dim + i]) * gate);
            }
    }
    project(&L->o, attended, mixed, tokens, threads);
    residual_and_norm(&L->norms, x, mixed, out, normed, tokens);
    free(h);
}

/* A sparse MoE block whose routed experts are quantized blobs (quant/layout.py): the router, the blob address
 * table with its layout, and the shared expert's matrices (any q3n_matrix format). */
typedef struct {
    q3n_matrix router; /* [experts, hidden] */
    int64_t experts, top_k, norm_topk;
    const int64_t *blobs; /* [experts]: each blob's address, valid for the chosen experts */
    const q3n_expert_layout *layout;
    q3n_matrix shared_gate, shared_up, shared_down, shared_expert_gate; /* the last [1, hidden] */
} q3n_moe_quant;
Q3N_EXPORT_SIZEOF(q3n_moe_quant)

/* The block's first half for `tokens` tokens: the router's choice per token (ids, weights [tokens, top_k],
 * logits [tokens, experts], as decode_kernels.c's fused block rounds them) and the shared expert's gate logit.
 * Given shared_gate_up (two [tokens, inter] buffers), the shared expert's gate and up projections of x too, in
 * the same parallel region (the resident block, which needs no pause between the halves to fetch experts). */
static void moe_quant_route(const q3n_moe_quant *m, const uint16_t *x, int64_t tokens, int64_t *ids, float *weights,
                            float *logits, float *gate_logits, uint16_t *const *shared_gate_up, int threads) {
    uint16_t *scores = malloc(sizeof(uint16_t) * (size_t)(tokens * (m->experts + 1)));
    const q3n_matrix on_x[4] = {m->router, m->shared_expert_gate, m->shared_gate, m->shared_up};
    uint16_t *const outputs[4] = {scores, scores + tokens * m->experts, shared_gate_up ? shared_gate_up[0] : NULL,
                                  shared_gate_up ? shared_gate_up[1] : NULL};
    project_many(on_x, shared_gate_up ? 4 : 2, x, outputs, tokens, threads);
    for (int64_t t = 0; t < tokens; t++) {
        for (int64_t e = 0; e < m->experts; e++) logits[t * m->experts + e] = bf16_to_f32(scores[t * m->experts + e]);
        gate_logits[t] = bf16_to_f32(scores[tokens * m->experts + t]);
        q3n_route_top_k(logits + t * m->experts, m->experts, m->top_k, (int)m->norm_topk, ids + t * m->top_k,
                        weights + t * m->top_k);
    }
    free(scores);
}

/* The second half, once the chosen experts' blob addresses are valid: the routed sum (q3n_experts_quant, in the
 * router's order) plus the shared expert scaled by sigmoid(gate logit), with the module path's bf16 roundings:
 * silu(gate x), its product with up x, down, the sigmoid, the scaled shared output, the final sum. The shared
 * gate and up projections are given (shared_gate_up, from moe_quant_route) or computed here (NULL). */
static void moe_quant_experts(const q3n_moe_quant *m, const uint16_t *x, uint16_t *out, int64_t tokens,
                              const int64_t *ids, const float *weights, const float *gate_logits,
                              uint16_t *const *shared_gate_up, int threads) {
    const int64_t hidden = m->shared_down.rows, inter = m->shared_gate.rows;
    uint16_t *routed = malloc(sizeof(uint16_t) * (size_t)(tokens * (2 * hidden + (shared_gate_up ? 0 : 2 * inter))));
    uint16_t *shared = routed + tokens * hidden, *gate = shared + tokens * hidden, *up = gate + tokens * inter;
    q3n_experts_quant(m->blobs, m->layout, ids, weights, tokens, m->top_k, x, routed, threads);
    if (shared_gate_up) {
        gate = shared_gate_up[0], up = shared_gate_up[1];
    } else {
        const q3n_matrix gate_up[2] = {m->shared_gate, m->shared_up};
        project_many(gate_up, 2, x, (uint16_t *const[]){gate, up}, tokens, threads);
    }
    for (int64_t i = 0; i < tokens * inter; i++)
        gate[i] = f32_to_bf16(round_bf16(silu(bf16_to_f32(gate[i]))) * bf16_to_f32(up[i]));
    project(&m->shared_down, gate, shared, tokens, threads);
    for (int64_t t = 0; t < tokens; t++) {
        const float scale = round_bf16(1.0f / (1.0f + expf(-gate_logits[t])));
        for (int64_t i = t * hidden; i < (t + 1) * hidden; i++)
            out[i] = f32_to_bf16(bf16_to_f32(routed[i]) + round_bf16(scale * bf16_to_f32(shared[i])));
    }
    free(routed);
}

/* The three entry points take q3n_moe_block_bf16's, q3n_moe_route_bf16's and q3n_moe_experts_bf16's arguments
 * (hidden is the struct's own), so cpu_kernels.py calls either family alike. The block: both halves for
 * `tokens` (at most Q3N_MAX_ROWS) tokens whose experts are all resident, each token with its one-token bits
 * (every kernel here computes a row alone); route and experts: one token, around acquiring its experts. */
void q3n_moe_block_quant(const uint16_t *x, uint16_t *out, const q3n_moe_quant *m, int64_t hidden, int64_t tokens,
                         int64_t *ids, float *weights, float *logits, int threads) {
    (void)hidden;
    float gate_logits[Q3N_MAX_ROWS];
    const int64_t inter = m->shared_gate.rows;
    uint16_t *gate_up = malloc(sizeof(uint16_t) * (size_t)(2 * tokens * inter));
    uint16_t *const shared_gate_up[2] = {gate_up, gate_up + tokens * inter};
    moe_quant_route(m, x, tokens, ids, weights, logits, gate_logits, shared_gate_up, threads);
    moe_quant_experts(m, x, out, tokens, ids, weights, gate_logits, shared_gate_up, threads);
    free(gate_up);
}

void q3n_moe_route_quant(const uint16_t *x, const q3n_moe_quant *m, int64_t hidden, int64_t *ids, float *weights,
                         float *logits, float *gate_logit, int threads) {
    (void)hidden;
    moe_quant_route(m, x, 1, ids, weights, logits, gate_logit, NULL, threads);
}

void q3n_moe_experts_quant(const uint16_t *x, uint16_t *out, const q3n_moe_quant *m, int64_t hidden,
                           const int64_t *ids, const float *weights, float gate_logit, int threads) {
    (void)hidden;
    moe_quant_experts(m, x, out, 1, ids, weights, &gate_logit, NULL, threads);
}

/* ---- a whole decode step: every decoder layer in one call ---- */

/* One decoder layer of a step: its mixer and MoE block (the structs above and decode_kernels.c's), and this
 * step's state and outputs, which the caller fills in before each call. */
typedef struct {
    int64_t attention;                 /* 1: mixer is a q3n_attention_layer, 0: a q3n_deltanet_layer */
    const void *mixer;
    int64_t quantized_moe;             /* 1: moe is a q3n_moe_quant, 0: a q3n_moe_weights */
    const void *moe;
    uint16_t *conv_state;              /* DeltaNet: as q3n_deltanet_layer_bf16 takes them */
    float *state, *kept_state;
    uint16_t *kept_conv;
    uint16_t *keys, *values;           /* attention: as q3n_attention_layer_bf16 takes them */
    int64_t past, capacity;
    int64_t *ids;                      /* the router's choice, for the routing observers: [tokens, top_k] */
    float *weights, *logits;           /* [tokens, top_k], [tokens, experts] */
} q3n_step_layer;
Q3N_EXPORT_SIZEOF(q3n_step_layer)

/* x [tokens, hidden] (tokens <= Q3N_MAX_ROWS) through `count` decoder layers in turn, in place: each layer's
 * mixer call, its MoE block on the post-attention norm, and the residual add, rounded as torch's bf16 add, in
 * exactly the calls DecoderLayer.forward makes one by one (so the same bits, without a Python round trip
 * per layer). cos, sin: [tokens, rotary_dim] for the attention layers. */
void q3n_decode_layers(const q3n_step_layer *layers, int64_t count, uint16_t *x, int64_t tokens,
                       const uint16_t *cos, const uint16_t *sin, int threads) {
    if (count == 0) return;
    const int64_t hidden = ((const q3n_layer_norms *)layers[0].mixer)->hidden, n = tokens * hidden;
    uint16_t *mixed = malloc(sizeof(uint16_t) * (size_t)(3 * n)), *normed = mixed + n, *moe = normed + n;
    for (int64_t i = 0; i < count; i++) {
        const q3n_step_layer *L = &layers[i];
        if (L->attention)
            q3n_attention_layer_bf16(L->mixer, x, mixed, normed, tokens, cos, sin, L->keys, L->values, L->past,
                                     L->capacity, threads);
        else
            q3n_deltanet_layer_bf16(L->mixer, x, mixed, normed, tokens, L->conv_state, L->state, L->kept_state,
                                    L->kept_conv, threads);
        if (L->quantized_moe)
            q3n_moe_block_quant(normed, moe, L->moe, hidden, tokens, L->ids, L->weights, L->logits, threads);
        else
            q3n_moe_block_bf16(normed, moe, L->moe, hidden, tokens, L->ids, L->weights, L->logits, threads);
        for (int64_t j = 0; j < n; j++) x[j] = f32_to_bf16(bf16_to_f32(mixed[j]) + bf16_to_f32(moe[j]));
    }
    free(mixed);
}
