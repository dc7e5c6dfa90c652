"""`qwen3next inspect`: what a model folder holds, as tables or (--json) one JSON object."""

from __future__ import annotations

import json
import re

import click

from qwen3next.errors import UsageError
from qwen3next.inspection import Report, Section, inspect
from qwen3next.model_path import DEMO_NOTICE, resolve_model_path
from qwen3next.offload import forecast
from qwen3next.offload.placement import Placement
from qwen3next.offload.router_report import format_table, layer_summaries, plot_heatmap
from qwen3next.offload.router_stats import RouterStatistics

from .options import as_flags, dtype_option, placement_options, with_options

_NUMBER = re.compile(r"[\d.,]+ ?[A-Za-z%]*")  # 12, 79,674,391,296, 311.16M, 622.3 MB, 0.4%


@click.command("inspect")
@click.argument("path", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as one JSON object.")
@click.option("--router-stats", "router_stats", is_flag=True,
              help="Show the model's router statistics (~/.cache/qwen3next/router-stats) instead.")
@click.option("--plot", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="With --router-stats: draw a layer x expert heatmap (needs qwen3next[plot]).")
@click.option("--plan", is_flag=True, help="Show the memory placement `run` would get with the flags below, and "
              "its predicted decode speed, instead (reads no weight).")
@with_options([dtype_option("bfloat16"), *placement_options()])
@click.option("--recalibrate", is_flag=True,
              help="With --plan: measure the disk and kernel speeds again instead of using the cached figures.")
@click.option("--quiet", "-q", is_flag=True, help="No notices on stderr.")
def inspect_command(path, as_json, router_stats, plot, plan, dtype, cpu_mem, gpu_mem, max_context, recalibrate, quiet):
    """Show PATH's layer layout, parameter counts, bytes per component and dtype, disk size, quantization.

    PATH is a model folder or a hub id already downloaded [default: the demo model].
    """
    if plot is not None and not router_stats:
        raise UsageError("--plot draws the router statistics: add --router-stats")
    if plan and router_stats:
        raise UsageError("--plan and --router-stats are two different reports: choose one")
    placing = {"--cpu-mem": cpu_mem, "--gpu-mem": gpu_mem, "--max-context": max_context,
               "--recalibrate": recalibrate or None, "--dtype": None if dtype == "bfloat16" else dtype}
    given = [flag for flag, value in placing.items() if value is not None]
    if given and not plan:
        raise UsageError(f"{', '.join(given)}: placement flags go with --plan")
    if path is None and not quiet:
        click.echo(f"qwen3next: {DEMO_NOTICE}", err=True)
    if router_stats:
        stats = RouterStatistics.for_model(resolve_model_path(path))
        if plot is not None:
            plot_heatmap(stats, plot)
        click.echo(json.dumps(layer_summaries(stats), indent=2) if as_json else format_table(stats))
        return
    if plan:
        report = as_flags(lambda: forecast.report(path, Placement(cpu_mem=cpu_mem, gpu_mem=gpu_mem,
                                                                  max_context=max_context), dtype, recalibrate, quiet))
    else:
        report = inspect(path)
    click.echo(json.dumps(report.as_dict(), indent=2) if as_json else render(report))


def render(report: Report) -> str:
    return "\n\n".join(_table(section) for section in report.sections)


def _table(section: Section) -> str:
    """A titled block of aligned columns; columns of numbers are right-aligned."""
    rows = [section.header, *section.rows] if section.header else section.rows
    columns = range(len(rows[0]))
    widths = [max(len(row[i]) for row in rows) for i in columns]
    numeric = [all(_NUMBER.fullmatch(row[i]) for row in section.rows) for i in columns]

    def line(row: tuple[str, ...]) -> str:
        cells = [cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(row, widths, numeric)]
        return "  " + "  ".join(cells).rstrip()

    return "\n".join([section.title, *(line(row) for row in rows)])
