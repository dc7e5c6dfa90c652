"""`qwen3next quantize --verify`: how far the quantized model is from its source, end to end.

Per-tensor relative errors are measured while converting (quant/convert.py). This module adds the
end-to-end view: both models run the same text and we compare next-token distributions (KL
divergence of the quantized from the source, top-1 agreement) and perplexity. Both models must fit
in RAM together; when they do not, the check says so and the per-tensor report stands alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from qwen3next.engine import load
from qwen3next.weights import CheckpointReader

from .convert import TensorError

# Public-domain sample text (the opening of Pride and Prejudice), used when no --verify-text is given.
SAMPLE_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters. \"My dear Mr. Bennet,\" said "
    "his lady to him one day, \"have you heard that Netherfield Park is let at last?\" Mr. Bennet replied "
    "that he had not. \"But it is,\" returned she; \"for Mrs. Long has just been here, and she told me all "
    "about it.\" Mr. Bennet made no answer."
)


@dataclass
class EndToEnd:
    tokens: int
    kl: float  # mean KL(source || quantized) per token, nats
    top1: float  # fraction of positions where both models' argmax agree
    perplexity_source: float
    perplexity_quantized: float


def fits_in_memory(src: Path, out: Path) -> tuple[bool, int]:
    """Whether both models (source as bf16, quantized as stored) fit in available RAM with room to spare."""
    with CheckpointReader(src) as a, CheckpointReader(out) as b:
        source = sum(a.byte_range(n)[2] // a.dtype(n).itemsize * 2 for n in a.names())
        needed = source + b.total_bytes()
    return needed < 0.7 * psutil.virtual_memory().available, needed


@torch.no_grad()
def end_to_end(src: Path, out: Path, text: str = SAMPLE_TEXT, max_tokens: int = 512) -> EndToEnd:
    """Run `text` through both models (bf16 activations) and compare their next-token distributions."""
    source = load(src, progress=False, quiet=True)
    ids = source.tokenizer.encode(text)[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the verification text needs at least two tokens")
    reference = source.logits(ids).float().cpu().log_softmax(-1)
    del source
    quantized = load(out, progress=False, quiet=True)
    candidate = quantized.logits(ids).float().cpu().log_softmax(-1)
    kl = (reference.exp() * (reference - candidate)).sum(-1).mean().item()
    top1 = (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item()
    targets = torch.tensor(ids[1:])

    def perplexity(log_probs: torch.Tensor) -> float:
        return math.exp(-log_probs[:-1].gather(1, targets[:, None]).mean().item())

    return EndToEnd(len(ids), kl, top1, perplexity(reference), perplexity(candidate))


def tensor_summary(errors: list[TensorError], worst: int = 5) -> list[str]:
    """Lines for stderr: mean and max relative error per bit width, then the worst tensors."""
    lines = []
    for bits in sorted({e.bits for e in errors}, reverse=True):
        values = [e.relative_error for e in errors if e.bits == bits]
        lines.append(f"{bits}-bit matrices: {len(values)}, relative RMS error mean {sum(values) / len(values):.4f}, "
                     f"max {max(values):.4f}")
    for e in sorted(errors, key=lambda e: -e.relative_error)[:worst]:
        lines.append(f"  {e.relative_error:.4f}  {e.bits}-bit  {e.name}")
    return lines
