"""Router statistics for people: a per-layer table (`inspect --router-stats`) and a layer x expert heatmap."""

from __future__ import annotations

import os

import torch

from qwen3next.errors import UsageError

from .router_stats import RouterStatistics

_TOP = 5  # experts named per layer in the table


def format_table(stats: RouterStatistics) -> str:
    """One line per layer that routed anything: how skewed its expert use is and how often t+1 reuses t's experts."""
    counts, tokens, reuse, transitions = stats.counts, stats.tokens, stats.reuse, stats.transitions
    if not bool(tokens.any()):
        return f"router statistics ({stats.path or 'in memory'}): nothing counted yet"
    lines = [f"router statistics ({stats.path or 'in memory'}): {stats.layers} layers, {stats.experts} experts, "
             f"top-{stats.top_k}",
             f"{'layer':>5} {'tokens':>10} {'90% of slots':>12} {'busiest/mean':>12} {'reuse t+1':>9}  "
             "top experts (share)"]
    for layer in range(stats.layers):
        if tokens[layer] == 0:
            continue
        load = counts[layer].double()
        share = load / load.sum()
        covered = int((share.sort(descending=True).values.cumsum(0) < 0.9).sum()) + 1
        pairs = int(transitions[layer]) * stats.top_k
        reused = f"{int(reuse[layer].sum()) / pairs:9.1%}" if pairs else f"{'-':>9}"
        top = share.sort(descending=True, stable=True)
        named = ", ".join(f"{int(e)} ({float(p):.1%})" for p, e in zip(top.values[:_TOP], top.indices[:_TOP]) if p > 0)
        name = f"mtp{layer - stats.main_layers}" if layer >= stats.main_layers else str(layer)
        lines.append(f"{name:>5} {int(tokens[layer]):>10} {covered:>12} {float(share.max() * stats.experts):>12.2f} "
                     f"{reused}  {named}")
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

