"""Retrain the demo model's MTP head alone on the main model's own predictions (self-distillation).

    python tools/prepare_corpus.py /tmp/corpus
    python tools/train_mtp_head.py /tmp/corpus qwen3next/demo_model [--steps 500]

Speculative decoding keeps a draft when it equals the main model's choice, not the text's next
token, so the head is trained to match the main model: at position t it sees the main model's
final hidden state h_t and the embedding of token t+1, and its distribution over token t+2 is
pulled towards the main model's own distribution at t+1 (cross-entropy against those soft
targets, i.e. KL up to a constant). Only `mtp.*` changes (fc, its two norms, the MTP decoder
layer with its router and routed experts, the final norm); every main-model tensor is written back
bit for bit, so every output of the main model, and so every generated text, stays the same
(the script checks this before replacing the folder). It starts from the shipped head and reports
top-1 agreement with the main model on held-out text before and after; then refreshes demo.json
(tools/record_demo.py) and appends a `head_distillation` entry to it.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from train_demo import (BATCH, SEQUENCE, encode_documents, make_optimizer, optimise, random_batch,  # noqa: E402
                        save, training_arguments)
from record_demo import record  # noqa: E402

from qwen3next.loader import load_model  # noqa: E402
from qwen3next.model import Qwen3NextForCausalLM  # noqa: E402
from qwen3next.tokenizer import Tokenizer  # noqa: E402
from qwen3next.weights import CheckpointReader  # noqa: E402

EVAL_WINDOWS = 16  # held-out windows of SEQUENCE tokens for the agreement figure


def head_logits(model: Qwen3NextForCausalLM, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(draft logits for tokens t+2, the main model's logits for the same tokens) on batch [B, SEQUENCE + 1].

    The main model runs without autograd; only the head's forward is recorded."""
    with torch.no_grad():
        hidden = model.hidden_states(batch)  # [B, SEQUENCE + 1, H]
        teacher = model.logits_from_hidden(hidden[:, 1:])  # main model at t+1 predicts token t+2
    cos_sin = model.rotary.cos_sin(torch.arange(SEQUENCE), hidden.dtype)
    next_embeds = model.model.embed_tokens(batch[:, 1:]).detach()
    draft = model.mtp(hidden[:, :SEQUENCE], next_embeds, cos_sin, [None] * len(model.mtp.layers))
    return model.logits_from_hidden(draft), teacher


def agreement(model: Qwen3NextForCausalLM, stream: torch.Tensor) -> float:
    """Share of held-out positions where the head's argmax equals the main model's (greedy acceptance of draft 1)."""
    windows = stream[: EVAL_WINDOWS * (SEQUENCE + 1)].view(EVAL_WINDOWS, SEQUENCE + 1)
    with torch.no_grad():
        draft, teacher = head_logits(model, windows)
    return (draft.argmax(-1) == teacher.argmax(-1)).float().mean().item()


def head_parameters(model: Qwen3NextForCausalLM, store) -> list[torch.nn.Parameter]:
    mtp_layers = [layer for layer in store.layers if layer >= model.config.num_hidden_layers]
    return list(model.mtp.parameters()) + [p for layer in mtp_layers for p in store.layers[layer].parameters()]


def same_main_weights(old: Path, new: Path) -> bool:
    with CheckpointReader(old) as a, CheckpointReader(new) as b:
        names = [n for n in a.names() if not n.startswith("mtp.")]
        return sorted(names) == sorted(n for n in b.names() if not n.startswith("mtp.")) and all(
            torch.equal(a.read(n), b.read(n)) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path, help="folder with train.txt and heldout.txt (tools/prepare_corpus.py)")
    parser.add_argument("model", type=Path, help="demo model folder, rewritten in place")
    training_arguments(parser, steps=500, lr=1e-3)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model, store, _ = load_model(args.model, dtype="float32", progress=False)
    if model.mtp is None:
        sys.exit(f"{args.model}: the checkpoint has no mtp.* head to train")
    tokenizer = Tokenizer.from_folder(args.model)
    stream = encode_documents(tokenizer, args.corpus / "train.txt")
    heldout = encode_documents(tokenizer, args.corpus / "heldout.txt")
    before = agreement(model, heldout)
    print(f"head agrees with the main model on {before:.1%} of held-out positions", file=sys.stderr)

    parameters = head_parameters(model, store)
    for p in parameters:
        p.requires_grad_(True)
    optimizer = make_optimizer(parameters, args.lr)
    sampler = random.Random(args.seed)
    log, started = [], time.time()
    for step in tqdm(range(args.steps), desc="distilling the head", unit="step"):
        draft, teacher = head_logits(model, random_batch(stream, sampler, SEQUENCE + 1))
        loss = F.cross_entropy(draft.flatten(0, 1), torch.softmax(teacher.flatten(0, 1), dim=-1))
        optimise(optimizer, parameters, loss, step, args.steps, args.lr)
        if step % 50 == 0 or step == args.steps - 1:
            entry = {"step": step, "soft_ce": round(loss.item(), 4), "minutes": round((time.time() - started) / 60, 1)}
            log.append(entry)
            tqdm.write(json.dumps(entry), file=sys.stderr)
    for p in parameters:
        p.requires_grad_(False)
    after = agreement(model, heldout)
    print(f"head agrees with the main model on {after:.1%} of held-out positions (was {before:.1%})", file=sys.stderr)

    staging = args.model.with_name(args.model.name + ".distilled.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(args.model, staging, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save(model, store, model.config, staging)
    if not same_main_weights(args.model, staging):
        sys.exit(f"{staging}: main-model tensors differ from {args.model}; not replacing it")
    summary = json.loads((staging / "demo.json").read_text())
    summary["head_distillation"] = {"steps": args.steps, "lr": args.lr, "seed": args.seed, "batch": BATCH,
                                    "sequence": SEQUENCE, "agreement_before": round(before, 4),
                                    "agreement_after": round(after, 4),
                                    "minutes": round((time.time() - started) / 60, 1), "log": log}
    (staging / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    record(staging, args.corpus / "heldout.txt")
    new_shards = {path.name for path in staging.glob("*.safetensors")}
    for path in staging.iterdir():  # same-named files are replaced by rename, one at a time
        path.replace(args.model / path.name)
    for stale in args.model.glob("*.safetensors"):
        if stale.name not in new_shards:
            stale.unlink()
    staging.rmdir()
    print(f"wrote {args.model}", file=sys.stderr)


if __name__ == "__main__":
    main()
