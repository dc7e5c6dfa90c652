"""Measuring a model on real text: perplexity, multi-token-prediction accuracy, routing statistics.

The text is cut into non-overlapping windows, each run from an empty state (so every figure is
reproducible and independent of the window order). Routing statistics answer what the offload
engine's cache and prefetcher need to know: how skewed expert usage is per layer, how often the
experts of token t are chosen again for token t+1, and how well layer L's choices predict layer
L+1's (a co-occurrence table fitted on the first half of the windows, scored on the second half).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .engine import Engine
from .errors import UsageError
from .moe import SparseMoE


@dataclass
class LayerRouting:
    experts_for_90_percent: float  # fraction of experts that together take 90% of the routed slots
    busiest_to_mean_load: float  # the most used expert's share over the average share
    reuse_next_token: float  # of token t's experts, the fraction chosen again for token t+1
    next_layer_recall: float | None  # top-k prediction of layer L+1's experts from layer L's (held-out half)
    next_layer_popularity_recall: float | None  # the same from layer L+1's k most used experts alone


@dataclass
class Evaluation:
    tokens: int  # tokens of the text read (after --max-tokens)
    predictions: int  # next-token predictions scored (each window's first token has none)
    perplexity: float
    mtp_accuracy: float | None  # next-next-token top-1 accuracy of the MTP head
    unigram_accuracy: float  # always guessing the text's most frequent token
    routing: list[LayerRouting] = field(default_factory=list)


def windows(ids: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(ids) - 2, size):
        chunk = list(ids[start : start + size])
        if len(chunk) >= 3:
            yield chunk


def evaluate(engine: Engine, text: str, window: int = 256, max_tokens: int | None = None) -> Evaluation:
    """Score `text` with the engine's model (see the module docstring)."""
    if not 3 <= window <= engine.context_length:
        raise UsageError(f"--window {window}: must be between 3 and the model's context ({engine.context_length})")
    ids = engine.tokenizer.encode(text)[:max_tokens]
    if len(ids) < 3:
        raise UsageError("the text is shorter than 3 tokens")
    model = engine.model
    moe_layers = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, SparseMoE)]
    nll, predicted, mtp_hits, mtp_count = 0.0, 0, 0, 0
    routes: list[list[torch.Tensor]] = [[] for _ in moe_layers]
    for chunk in windows(ids, window):
        if engine.router_stats is not None:
            engine.router_stats.start_sequence()  # windows are independent texts: no reuse across them
        tensor = torch.tensor([chunk], device=engine.device)
        with torch.inference_mode():
            hidden = model.hidden_states(tensor)
            logits = model.logits_from_hidden(hidden)[0].float()
            nll += F.cross_entropy(logits[:-1], tensor[0, 1:], reduction="sum").item()
            predicted += len(chunk) - 1
            for layer, moe in enumerate(moe_layers):
                routes[layer].append(moe.last_routing.ids.cpu())
            if model.mtp is not None:
                draft = _mtp_logits(model, hidden, tensor)
                mtp_hits += (draft.argmax(-1) == tensor[0, 2:]).sum().item()
                mtp_count += len(chunk) - 2
    counts = torch.bincount(torch.tensor(ids))
    return Evaluation(
        tokens=len(ids),
        predictions=predicted,
        perplexity=math.exp(nll / predicted),
        mtp_accuracy=mtp_hits / mtp_count if mtp_count else None,
        unigram_accuracy=counts.max().item() / len(ids),
        routing=routing_statistics(routes, engine.config.num_experts),
    )


def _mtp_logits(model, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Draft logits [T - 2, vocab]: position t sees h_t and token t+1 and guesses token t+2."""
    T = ids.shape[1]
    cos_sin = model.rotary.cos_sin(torch.arange(T - 2, device=ids.device), hidden.dtype)
    next_embeds = model.model.embed_tokens(ids[:, 1 : T - 1])
    draft = model.mtp(hidden[:, : T - 2], next_embeds, cos_sin, [None] * len(model.mtp.layers))
    return model.logits_from_hidden(draft)[0].float()


def routing_statistics(routes: list[list[torch.Tensor]], experts: int) -> list[LayerRouting]:
    """Per layer, from its chosen ids per window ([T, k] tensors, windows in text order)."""
    stats = []
    for layer, chosen in enumerate(routes):
        load = torch.bincount(torch.cat(chosen).flatten(), minlength=experts).float()
        share = load.sort(descending=True).values.cumsum(0) / load.sum()
        reuse = [_overlap(w[:-1], w[1:]) for w in chosen if len(w) > 1]
        recall = popularity = None
        if layer + 1 < len(routes):
            recall, popularity = _next_layer_prediction(chosen, routes[layer + 1], experts)
        stats.append(LayerRouting(
            experts_for_90_percent=((share < 0.9).sum().item() + 1) / experts,
            busiest_to_mean_load=(load.max() / load.mean()).item(),
            reuse_next_token=float(torch.cat(reuse).mean()) if reuse else 0.0,
            next_layer_recall=recall,
            next_layer_popularity_recall=popularity,
        ))
    return stats


def _overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, the fraction of a's ids also in b's ([N, k] each)."""
    return (a[:, :, None] == b[:, None, :]).any(-1).float().mean(-1)


def _next_layer_prediction(this: list[torch.Tensor], nxt: list[torch.Tensor], experts: int) -> tuple[float, float] | tuple[None, None]:
    half = len(this) // 2
    if half == 0:
        return None, None
    fit_this, fit_next = torch.cat(this[:half]), torch.cat(nxt[:half])
    k = fit_next.shape[1]
    one_hot = lambda ids: F.one_hot(ids, experts).sum(1).float()  # noqa: E731  [N, experts]
    table = one_hot(fit_this).T @ one_hot(fit_next)  # co-occurrence [experts of L, experts of L+1]
    test_this, test_next = torch.cat(this[half:]), torch.cat(nxt[half:])
    guesses = (one_hot(test_this) @ table).topk(k, dim=-1).indices
    popular = torch.bincount(fit_next.flatten(), minlength=experts).topk(k).indices.expand_as(test_next)
    return _overlap(test_next, guesses).mean().item(), _overlap(test_next, popular).mean().item()
