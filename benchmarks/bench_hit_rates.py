"""Expert-cache hit rates on real routing: the real cache and reads, side by side with an idealised replay.

    python benchmarks/bench_hit_rates.py                      # 2048 measured tokens (~6 minutes on 2 shared cores)
    python benchmarks/bench_hit_rates.py --tokens 256 --shares 25   # a quick look

The model is the package's demo model (8 layers, 32 experts top-4, plus the MTP layer's 32), quantized
to 4 bits into a temporary folder with `qwen3next quantize`'s Python API. tests/data/heldout.txt is
cut in two at its middle line: router statistics (the `stats` policy's priors and fill order, and the
prefetcher's co-activation) are built from the first half, as `qwen3next eval --text` builds them;
hit rates are measured on the first --tokens tokens of the second half, which nothing was fitted or
tuned on. Router statistics go to a cache folder inside the work folder, not the user's.

Each measured run loads the folder under a budget that leaves exactly the wanted expert slots
(12 / 25 / 50% of the 256 experts decode uses) and reads the text teacher-forced, one token per step
(`Engine.logits(chunk=1)`: every step is a decode-shaped cache acquire), in windows of --window
tokens. Reads are the real ones: the real ExpertCache and BlobReader, the checkpoint's pages dropped
first and after every read. A hit is an expert resident when its layer computes (a prefetched expert
whose read is still in flight is a miss). The measured text's routing is not counted into the
statistics (the statistics observer is detached), and every run's logits are checked equal to the
fully resident run's, so no budget, policy or prefetch changed a bit of the output.

Next to each run, the same routing (recorded from the resident run) is replayed through an ExpertCache
of the same slots, policy, priors and starting contents whose reads complete instantly: the ideal
the real run would reach if reads cost no time. "+ prefetch" adds offload/prefetch.LookaheadPrefetcher
(speculative gating from the layer before, rescored with the statistics' co-activation, candidates
adapted to measured precision; "2 ahead" also guesses from two layers before), installed as the
routing observer; its signals' recall and precision follow the table.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

import qwen3next
from qwen3next.evaluate import evaluate
from qwen3next.model_path import resolve_model_path, user_cache
from qwen3next.moe import set_routing_observer
from qwen3next.offload.disk import drop_cached_pages
from qwen3next.offload.expert_cache import ExpertCache
from qwen3next.offload.prefetch import SIGNALS, LookaheadPrefetcher
from qwen3next.offload.router_stats import RouterStatistics
from qwen3next.quant.convert import quantize_checkpoint
from qwen3next.quant.policy import Policy

ROOT = Path(__file__).resolve().parents[1]
# eviction policy, and the prefetcher's horizons (None: no prefetch)
POLICIES = {"lru": None, "lfu": None, "stats": None, "lru + prefetch": (1,), "stats + prefetch": (1,),
            "stats + prefetch 2 ahead": (1, 2)}


@dataclass
class Workload:
    """What every run reads and is checked against: the measured windows, the resident run's logits and
    routing, and the router statistics of the first half."""

    windows: list[list[int]]
    reference: list[torch.Tensor]
    steps: list[tuple[int, torch.Tensor, torch.Tensor]]
    statistics: RouterStatistics
    window: int
    min_precision: float


class TraceRecorder:
    """A routing observer that keeps every decode step's MoE input and choice, in the order layers ran."""

    def __init__(self):
        self.steps: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._input: torch.Tensor | None = None

    def before_routing(self, layer: int, x: torch.Tensor) -> None:
        self._input = x.clone()

    def routed(self, layer: int, ids: torch.Tensor) -> None:
        self.steps.append((layer, self._input, ids.clone()))


class InstantReader:
    """A BlobReader whose reads complete as they are submitted, reading nothing: the idealised disk."""

    def submit(self, path, offset, length, target, what, priority=0) -> Future:
        future: Future = Future()
        future.set_result(None)
        return future

    def close(self) -> None:
        pass


def isolate_statistics(workdir: Path) -> None:
    """Router statistics in a cache folder of the work folder's own; compiled kernels shared with the user's."""
    kernels = user_cache() / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    cache = workdir / "cache"
    shutil.rmtree(cache / "router-stats", ignore_errors=True)  # a reused work folder counts afresh
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "kernels").exists():
        (cache / "kernels").symlink_to(kernels, target_is_directory=True)
    os.environ["QWEN3NEXT_CACHE"] = str(cache)


def halves(path: Path) -> tuple[str, str]:
    """The text cut at the line break nearest its middle."""
    text = path.read_text(encoding="utf-8")
    middle = text.index("\n", len(text) // 2) + 1
    return text[:middle], text[middle:]


def teacher_forced(engine, windows: list[list[int]]) -> list[torch.Tensor]:
    return [engine.logits(window, chunk=1) for window in windows]


def ideal_twin(cache: ExpertCache) -> ExpertCache:
    """An ExpertCache with the same slots, policy, priors and contents as `cache`, over instant reads."""
    twin = ExpertCache(cache.sources, cache.slot_count, 1, InstantReader(), cache.policy, cache.priors)
    order = {layer: [] for layer in cache.layers}
    for owner in cache.owner:  # the same experts into the same slots (fill hands out low slots first)
        if owner is not None:
            order[owner[0]].append(owner[1])
    twin.fill(order=order)
    return twin


def replay(cache: ExpertCache, steps, prefetcher: LookaheadPrefetcher | None) -> None:
    """The recorded decode steps through `cache`, in the order the model ran them (as SparseMoE calls them)."""
    for layer, x, ids in steps:
        if prefetcher is not None:
            prefetcher.before_routing(layer, x)
        chosen = ids.flatten().tolist()
        cache.acquire(layer, chosen)
        cache.release(layer, chosen)
        if prefetcher is not None:
            prefetcher.routed(layer, ids)


def make_prefetcher(engine, cache: ExpertCache, horizons, work: Workload) -> LookaheadPrefetcher | None:
    if horizons is None:
        return None
    routers = {i: layer.mlp.gate for i, layer in enumerate(engine.model.model.layers)}
    return LookaheadPrefetcher(cache, routers, engine.config.num_experts_per_tok, work.statistics,
                               horizons=horizons, min_precision=work.min_precision)


def slot_budget(folder: Path, resident_plan, slots: int) -> int:
    """A cpu_mem that leaves exactly `slots` expert slots: a budgeted plan less its slots, plus these (what a
    budgeted plan holds beside its slots does not depend on the budget). The probe is the largest budget
    below full residency, so it is budgeted whatever else a budgeted plan reserves."""
    plan = resident_plan
    probe = plan.always_active + plan.context_state + (plan.experts - 1) * plan.slot_bytes
    try:
        plan = qwen3next.load(folder, cpu_mem=probe, max_context=plan.max_context, quiet=True, router_stats=False).plan
    except qwen3next.RequestError as exc:
        sys.exit(f"no budget below full residency runs with a {plan.max_context}-token context ({exc}); "
                 "try a smaller --window")
    return plan.budget_for_slots(slots)


def measure(folder: Path, budget: int, slots: int, policy: str, work: Workload) -> dict:
    """One real run under the budget and its ideal replay."""
    for shard in folder.glob("*.safetensors"):
        drop_cached_pages(shard)
    base, horizons = policy.split(" + ")[0], POLICIES[policy]
    engine = qwen3next.load(folder, cpu_mem=budget, max_context=work.window, expert_policy=base, quiet=True,
                            router_stats=base == "stats")
    cache = engine.expert_store.cache
    if cache.slot_count != slots:
        sys.exit(f"the budget gave {cache.slot_count} slots, not {slots} (a budgeted plan's other reservations "
                 f"leave fewer; try a smaller --window)")
    twin = ideal_twin(cache)
    prefetcher = make_prefetcher(engine, cache, horizons, work)
    ideal_prefetcher = make_prefetcher(engine, twin, horizons, work)
    set_routing_observer(engine.model, prefetcher)  # the statistics observer off: the measured text stays unseen
    before = copy.copy(cache.counters)
    started = time.perf_counter()
    logits = teacher_forced(engine, work.windows)
    seconds = time.perf_counter() - started
    real = cache.counters.minus(before)
    if not all(torch.equal(a, b) for a, b in zip(logits, work.reference)):
        sys.exit(f"{policy} under {slots} slots changed the logits")
    engine.close()
    before = copy.copy(twin.counters)
    replay(twin, work.steps, ideal_prefetcher)
    return {"policy": policy, "slots": slots, "real": real, "ideal": twin.counters.minus(before),
            "tok_s": sum(map(len, work.windows)) / seconds, "prefetcher": prefetcher}


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def report(results: list[dict], experts: int, tokens: int) -> None:
    print("\n| policy | resident | real hit rate | ideal hit rate (instant reads) | prefetch precision real / ideal "
          "| prefetch recall real / ideal | late prefetches | disk MiB per token | I/O stall s | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        real, ideal = r["real"], r["ideal"]
        prefetching = r["prefetcher"] is not None
        precision = f"{percent(real.prefetch_precision)} / {percent(ideal.prefetch_precision)}" if prefetching else "-"
        recall = f"{percent(real.prefetch_recall)} / {percent(ideal.prefetch_recall)}" if prefetching else "-"
        print(f"| {r['policy']} | {r['slots']} ({r['slots'] / experts:.0%}) | **{percent(real.hit_rate)}** "
              f"| {percent(ideal.hit_rate)} | {precision} | {recall} "
              f"| {real.late if prefetching else '-'} | {real.disk_bytes / tokens / 2**20:.2f} "
              f"| {real.stall_seconds:.2f} | {r['tok_s']:.0f} |")
    prefetchers = {}  # one per set of horizons: the signals depend on the routing only, not on the cache
    for r in results:
        if r["prefetcher"] is not None:
            prefetchers.setdefault(r["prefetcher"].horizons, r["prefetcher"])
    if not prefetchers:
        return
    k = next(iter(prefetchers.values())).top_k
    print("\nSignals on the measured routing (a candidate is correct when its target layer chooses it, read or not; "
          "the same in every run):\n")
    print(f"| signal | candidates per step (adapted) | recall | precision | recall at top {k} | at top {2 * k} |")
    print("|---|---|---|---|---|---|")
    rows = {name: f for p in prefetchers.values() for name, f in zip(SIGNALS, p.figures) if f.steps}
    rows.update({f"together, {' and '.join(f'L-{h}' for h in horizons)}": p.union
                 for horizons, p in prefetchers.items()})
    for name, f in rows.items():
        fixed = f"{percent(f.recall_at(k))} | {percent(f.recall_at(2 * k))}" if f.rank_hits else "- | -"
        print(f"| {name} | {f.candidates / f.steps:.1f} | {percent(f.recall)} | {percent(f.precision)} | {fixed} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="measured tokens (from the second half)")
    parser.add_argument("--window", type=int, default=256, help="tokens per teacher-forced window (the context)")
    parser.add_argument("--stats-tokens", type=int, default=32768, help="tokens of the first half the statistics count")
    parser.add_argument("--shares", type=int, nargs="+", default=[12, 25, 50], help="percent of experts resident")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES, metavar="POLICY",
                        help=f"of {', '.join(map(repr, POLICIES))}")
    parser.add_argument("--min-precision", type=float, default=0.25, help="the prefetcher's per-rank threshold")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (others share this machine)")
    parser.add_argument("--workdir", type=Path, help="where the 4-bit folder goes (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="qwen3next-hit-rates-") as temporary:
        workdir = args.workdir or Path(temporary)
        isolate_statistics(workdir)
        folder = workdir / "q4"
        if not (folder / "config.json").exists():
            quantize_checkpoint(resolve_model_path(None), folder, Policy(4), progress=False)
        statistics_text, measured_text = halves(ROOT / "tests" / "data" / "heldout.txt")
        with qwen3next.load(folder, quiet=True) as engine:
            started = time.perf_counter()
            evaluate(engine, statistics_text, window=args.window, max_tokens=args.stats_tokens)
            print(f"router statistics: {args.stats_tokens} tokens of the first half in "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
        resident = qwen3next.load(folder, max_context=args.window, quiet=True, router_stats=False)
        ids = resident.tokenizer.encode(measured_text)[: args.tokens]
        windows = [ids[i : i + args.window] for i in range(0, len(ids), args.window)]
        recorder = TraceRecorder()
        set_routing_observer(resident.model, recorder)
        work = Workload(windows, teacher_forced(resident, windows), recorder.steps, RouterStatistics.for_model(folder),
                        args.window, args.min_precision)
        plan, config = resident.plan, resident.config
        experts = config.num_hidden_layers * config.num_experts  # the layers decode runs (not the MTP layer)
        results = []
        for share in args.shares:
            slots = round(experts * share / 100)
            budget = slot_budget(folder, plan, slots)
            for policy in args.policies:
                results.append(measure(folder, budget, slots, policy, work))
                r = results[-1]
                print(f"{policy} {slots} slots: real {percent(r['real'].hit_rate)}, "
                      f"ideal {percent(r['ideal'].hit_rate)}", file=sys.stderr)
    print(f"\n`python benchmarks/bench_hit_rates.py {' '.join(sys.argv[1:])}`: {len(ids)} tokens teacher-forced "
          f"(windows of {args.window}), statistics from {args.stats_tokens} tokens of the first half, "
          f"torch threads {args.threads}")
    report(results, experts, len(ids))


if __name__ == "__main__":
    main()
