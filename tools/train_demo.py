"""Train the embedded demo model: a small Qwen3-Next with every feature of the real one.

    python tools/prepare_corpus.py /tmp/corpus
    python tools/train_demo.py /tmp/corpus qwen3next/demo_model [--steps 1100]

Uses the project's own model code with autograd, on the CPU, from a fixed seed (about an hour on
2 cores). The model: 8 layers in the 3:1 Gated DeltaNet / gated attention pattern, a sparse MoE
of 32 routed experts (top-4) plus a gated shared expert in every layer, zero-centered norms,
partial rotary attention with output gates, and a multi-token-prediction head with the real
checkpoint's `mtp.*` structure, trained to predict the token after next from the main model's
final hidden state and the next token's embedding. A Switch-style load-balancing loss keeps
routing balanced overall. The tokenizer is a byte-level BPE with Qwen's special tokens and chat
template. Output: a Hugging Face-layout folder (config.json, bf16 safetensors, tokenizer files,
generation_config.json) plus demo.json with the training log and the figures tests hold the
model to (tools/record_demo.py).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the Qwen-shaped tokenizer writer lives with the test fixtures

from tokenizer_fixture import QWEN_SPECIAL_TOKENS, write_tokenizer_files  # noqa: E402

from qwen3next.config import Qwen3NextConfig  # noqa: E402
from qwen3next.model import Qwen3NextForCausalLM  # noqa: E402
from qwen3next.moe import SparseMoE, StackedExperts  # noqa: E402
from qwen3next.checkpoint_names import PROJECTIONS, expert_layer_prefixes, expert_tensor_name  # noqa: E402
from qwen3next.offload.store import ResidentExpertStore  # noqa: E402
from qwen3next.tokenizer import Tokenizer  # noqa: E402
from qwen3next.weights import write_checkpoint  # noqa: E402
from record_demo import record  # noqa: E402  (tools/, beside this file)

VOCAB = 6144
SEQUENCE = 256
BATCH = 16
MTP_WEIGHT = 0.3
BALANCE_WEIGHT = 0.01
INIT_STD = 0.02

CONFIG = {
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "vocab_size": VOCAB,
    "hidden_size": 256,
    "num_hidden_layers": 8,
    "full_attention_interval": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "partial_rotary_factor": 0.25,
    "rope_theta": 10000,
    "rope_scaling": None,
    "linear_num_key_heads": 4,
    "linear_num_value_heads": 8,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
    "linear_conv_kernel_dim": 4,
    "num_experts": 32,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 56,
    "shared_expert_intermediate_size": 128,
    "intermediate_size": 512,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": INIT_STD,
    "router_aux_loss_coef": BALANCE_WEIGHT,
    "output_router_logits": False,
    "use_cache": True,
    "torch_dtype": "bfloat16",
}


def build_tokenizer(corpus: Path, out: Path) -> Tokenizer:
    paragraphs = [p for p in (corpus / "train.txt").read_text(encoding="utf-8").split("\n\n") if p.strip()]
    total = write_tokenizer_files(out, vocab_size=VOCAB - len(QWEN_SPECIAL_TOKENS), corpus=paragraphs)
    if total != VOCAB:
        sys.exit(f"tokenizer has {total} ids, expected {VOCAB}")
    return Tokenizer.from_folder(out)


def encode_documents(tokenizer: Tokenizer, path: Path) -> torch.Tensor:
    """All documents of a file as one id stream, each followed by <|endoftext|>."""
    end = tokenizer.token_id("<|endoftext|>")
    ids: list[int] = []
    for document in path.read_text(encoding="utf-8").split("\n\n\n"):
        ids += tokenizer.encode(document) + [end]
    return torch.tensor(ids, dtype=torch.int64)


def initialise(model: Qwen3NextForCausalLM, config: Qwen3NextConfig, generator: torch.Generator) -> ResidentExpertStore:
    """HF-style init (normal 0.02, zero-centered norms at 0, A in [1, 16]); returns a trainable expert store."""
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.data = torch.empty_like(p).uniform_(1, 16, generator=generator).log()
        elif name.endswith("dt_bias") or name.endswith("linear_attn.norm.weight"):
            p.data = torch.ones_like(p)
        elif "norm" in name:
            p.data = torch.zeros_like(p)
        else:
            p.data = torch.randn(p.shape, generator=generator) * INIT_STD
    H, I, E = config.hidden_size, config.moe_intermediate_size, config.num_experts
    layers = {
        layer: StackedExperts(torch.randn(E, 2 * I, H, generator=generator) * INIT_STD,
                              torch.randn(E, H, I, generator=generator) * INIT_STD)
        for layer in expert_layer_prefixes(config, with_mtp=True)
    }
    store = ResidentExpertStore(layers)
    model.set_expert_store(store)
    return store


def balance_loss(model: Qwen3NextForCausalLM) -> torch.Tensor:
    """Switch-style: experts * sum_e (fraction of slots routed to e) * (mean router probability of e)."""
    losses = []
    for module in model.modules():
        if isinstance(module, SparseMoE) and module.last_routing is not None:
            routing = module.last_routing
            experts = routing.logits.shape[-1]
            probs = torch.softmax(routing.logits.float(), dim=-1)
            share = torch.bincount(routing.ids.flatten(), minlength=experts).float() / routing.ids.numel()
            losses.append(experts * (share * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def losses(model: Qwen3NextForCausalLM, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token loss, MTP (token after next) loss, balance loss for a batch [B, SEQUENCE + 2]."""
    inputs = batch[:, :SEQUENCE]
    hidden = model.hidden_states(inputs)
    lm = F.cross_entropy(model.logits_from_hidden(hidden).flatten(0, 1), batch[:, 1 : SEQUENCE + 1].flatten())
    # MTP at position t sees h_t and token t+1 and predicts token t+2
    positions = torch.arange(SEQUENCE)
    cos_sin = model.rotary.cos_sin(positions, hidden.dtype)
    next_embeds = model.model.embed_tokens(batch[:, 1 : SEQUENCE + 1])
    draft = model.mtp(hidden, next_embeds, cos_sin, [None] * len(model.mtp.layers))
    mtp = F.cross_entropy(model.logits_from_hidden(draft).flatten(0, 1), batch[:, 2 : SEQUENCE + 2].flatten())
    return lm, mtp, balance_loss(model)  # after the MTP forward, so every router's latest decision counts


def learning_rate(step: int, steps: int, peak: float) -> float:
    warmup = 50
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def training_arguments(parser: argparse.ArgumentParser, steps: int, lr: float) -> None:
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)


def make_optimizer(parameters: list[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only."""
    matrices = [p for p in parameters if p.dim() >= 2]
    vectors = [p for p in parameters if p.dim() < 2]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def random_batch(stream: torch.Tensor, sampler: random.Random, length: int) -> torch.Tensor:
    """BATCH windows of `length` tokens at random starts of the id stream."""
    starts = [sampler.randrange(0, len(stream) - length) for _ in range(BATCH)]
    return torch.stack([stream[s : s + length] for s in starts])


def optimise(optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter], loss: torch.Tensor,
             step: int, steps: int, peak: float) -> None:
    """One update: the scheduled learning rate, gradients clipped to norm 1."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, steps, peak)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()


def save(model: Qwen3NextForCausalLM, store: ResidentExpertStore, config: Qwen3NextConfig, out: Path) -> None:
    def tensors():
        for name, tensor in model.state_dict().items():
            yield name, tensor.detach().to(torch.bfloat16)
        I = config.moe_intermediate_size
        for layer, prefix in expert_layer_prefixes(config, with_mtp=True).items():
            experts = store.layers[layer]
            for e in range(config.num_experts):
                gate_up, down = experts.gate_up[e].detach(), experts.down[e].detach()
                for projection, tensor in zip(PROJECTIONS, (gate_up[:I], gate_up[I:], down)):
                    yield expert_tensor_name(prefix, e, projection), tensor.to(torch.bfloat16)

    write_checkpoint(out, tensors(), max_shard_bytes=20 * 2**20)  # every tracked file under 25 MB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path, help="folder with train.txt and heldout.txt (tools/prepare_corpus.py)")
    parser.add_argument("out", type=Path, help="model folder to write")
    training_arguments(parser, steps=1100, lr=3e-3)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(args.corpus, args.out)
    end_id, im_end = tokenizer.token_id("<|endoftext|>"), tokenizer.token_id("<|im_end|>")
    stream = encode_documents(tokenizer, args.corpus / "train.txt")
    print(f"training tokens: {len(stream):,}", file=sys.stderr)

    raw_config = dict(CONFIG, bos_token_id=end_id, eos_token_id=im_end)
    config = Qwen3NextConfig.from_dict(raw_config)
    model = Qwen3NextForCausalLM(config, with_mtp=True)
    store = initialise(model, config, generator)
    parameters = list(model.parameters()) + list(store.parameters())
    for p in parameters:
        p.requires_grad_(True)
    print(f"parameters: {sum(p.numel() for p in parameters):,}", file=sys.stderr)
    optimizer = make_optimizer(parameters, args.lr)

    sampler = random.Random(args.seed)
    log = []
    started = time.time()
    model.train()
    for step in tqdm(range(args.steps), desc="training", unit="step"):
        lm, mtp, balance = losses(model, random_batch(stream, sampler, SEQUENCE + 2))
        optimise(optimizer, parameters, lm + MTP_WEIGHT * mtp + BALANCE_WEIGHT * balance, step, args.steps, args.lr)
        if step % 50 == 0 or step == args.steps - 1:
            entry = {"step": step, "lm": round(lm.item(), 4), "mtp": round(mtp.item(), 4),
                     "balance": round(balance.item(), 4), "minutes": round((time.time() - started) / 60, 1)}
            log.append(entry)
            tqdm.write(json.dumps(entry), file=sys.stderr)

    model.eval()
    for p in parameters:
        p.requires_grad_(False)
    save(model, store, config, args.out)
    (args.out / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
    generation = {"bos_token_id": end_id, "pad_token_id": end_id, "eos_token_id": [im_end, end_id],
                  "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    (args.out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    summary = {"seed": args.seed, "steps": args.steps, "batch": BATCH, "sequence": SEQUENCE, "lr": args.lr,
               "training_tokens": len(stream), "minutes": round((time.time() - started) / 60, 1), "log": log}
    (args.out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    record(args.out, args.corpus / "heldout.txt")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
