"""Router statistics for people: a per-layer table (`inspect --router-stats`) and a layer x expert heatmap."""

from __future__ import annotations

import os

import torch

from qwen3next.errors import UsageError

from .router_stats import RouterStatistics

_TOP = 5  # experts named per layer in the table


def layer_summaries(stats: RouterStatistics) -> list[dict]:
    """Per layer that routed anything: tokens, experts covering 90% of slots, busiest/mean load, t->t+1 reuse,
    and the top experts with their shares (the table's rows, and `inspect --router-stats --json`)."""
    counts, tokens, reuse, transitions = stats.counts, stats.tokens, stats.reuse, stats.transitions
    rows = []
    for layer in range(stats.layers):
        if tokens[layer] == 0:
            continue
        load = counts[layer].double()
        share = load / load.sum()
        pairs = int(transitions[layer]) * stats.top_k
        top = share.sort(descending=True, stable=True)
        rows.append({
            "layer": f"mtp{layer - stats.main_layers}" if layer >= stats.main_layers else str(layer),
            "tokens": int(tokens[layer]),
            "experts_for_90_percent": int((top.values.cumsum(0) < 0.9).sum()) + 1,
            "busiest_to_mean": float(share.max() * stats.experts),
            "reuse_next_token": int(reuse[layer].sum()) / pairs if pairs else None,
            "top_experts": {int(e): float(p) for p, e in zip(top.values[:_TOP], top.indices[:_TOP]) if p > 0},
        })
    return rows


def format_table(stats: RouterStatistics) -> str:
    """One line per layer that routed anything: how skewed its expert use is and how often t+1 reuses t's experts."""
    rows = layer_summaries(stats)
    if not rows:
        return f"router statistics ({stats.path or 'in memory'}): nothing counted yet"
    lines = [f"router statistics ({stats.path or 'in memory'}): {stats.layers} layers, {stats.experts} experts, "
             f"top-{stats.top_k}",
             f"{'layer':>5} {'tokens':>10} {'90% of slots':>12} {'busiest/mean':>12} {'reuse t+1':>9}  "
             "top experts (share)"]
    for row in rows:
        reused = f"{'-':>9}" if row["reuse_next_token"] is None else f"{row['reuse_next_token']:9.1%}"
        named = ", ".join(f"{e} ({p:.1%})" for e, p in row["top_experts"].items())
        lines.append(f"{row['layer']:>5} {row['tokens']:>10} {row['experts_for_90_percent']:>12} "
                     f"{row['busiest_to_mean']:>12.2f} {reused}  {named}")
    return "\n".join(lines)


def plot_heatmap(stats: RouterStatistics, path: str | os.PathLike) -> None:
    """Write a layer x expert heatmap of each expert's load relative to its layer's mean to `path` (png, svg, ...)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError('--plot needs matplotlib: pip install "qwen3next[plot]"') from None
    counts = stats.counts.double()
    mean = counts.mean(1, keepdim=True)
    relative = torch.where(mean > 0, counts / mean.clamp(min=1e-12), torch.zeros_like(counts))
    figure = Figure(figsize=(max(6.0, min(stats.experts / 16, 24.0)), max(3.0, stats.layers / 4)))
    axes = figure.add_subplot()
    image = axes.imshow(relative.tolist(), aspect="auto", interpolation="nearest", cmap="magma")
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_title(f"{stats.model or stats.identity}: expert load / layer mean "
                   f"({int(stats.tokens.max())} tokens)")
    figure.colorbar(image, ax=axes)
    figure.savefig(path, bbox_inches="tight")

