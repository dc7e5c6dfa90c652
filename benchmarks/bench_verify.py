"""What a speculative verify pass costs: decode_steps over T = N + 1 positions against one decode step,
alternating, on any model folder (resident, or with experts read from disk under --cpu-mem).

    python benchmarks/bench_verify.py                                   # the embedded demo model
    python benchmarks/bench_verify.py --model /tmp/q4-real --cpu-mem 4G --max-rows 3

Per T: milliseconds per pass (and of them, inside the C kernels' calls), the ratio to one plain step,
and the decode speed-up that ratio gives at
the demo model's acceptance (--acceptance: the measured fraction of drafts accepted at each draft
position, benchmarks/bench_speculative.py), counting the head's draft steps as measured here too:
speed-up = (1 + sum of the acceptance rates) / (verify ratio + N x draft ratio). Random real-width weights
accept almost nothing, so at real width this implied figure is the one to read. With experts read from
disk, the expert cache's disk bytes per pass are printed too (the file's pages are dropped first).

For a quantized folder it also prints what each pass touches: every dense matrix of the main model once,
T rows of the embeddings, and each distinct routed expert the T positions chose (counted by a routing
observer), and the time reading those bytes once takes at the machine's read bandwidth, measured in the
same run, on the engine's threads (the better of a torch sum over 1 GiB and our own one-row 4-bit
product over a 512 MiB matrix). "over the read" is the pass's time over that: the kernels issue's goal is at most 1.2
for T = 2..8 at real width. A model to measure it on (4 layers of the real widths, every matrix at 4 bits):

    python -c "import sys; sys.path.insert(0, 'tests'); from checkpoints import write_quantized_model as w; \
        w(__import__('pathlib').Path('/tmp/q4-real'), 4, bits_for=(('*.weight', 4),))"
    python benchmarks/bench_verify.py --model /tmp/q4-real --max-rows 8 --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import qwen3next
from decode_breakdown import TimedLibrary  # benchmarks/, beside this file
from qwen3next import cpu_kernels
from qwen3next.moe import RoutingObservers, SparseMoE, set_routing_observer
from qwen3next.offload.disk import drop_cached_pages
from qwen3next.sampling import Sampler, SamplingParams
from qwen3next.speculative import Drafter, GreedyRule


class DistinctExperts:
    """A routing observer: the distinct experts each layer chose since the last reset."""

    needs_hidden = False  # only the choices: a whole pass may still run in one C call

    def __init__(self):
        self.chosen: dict[int, set[int]] = {}

    def before_routing(self, layer: int, x: torch.Tensor) -> None:
        pass

    def routed(self, layer: int, ids: torch.Tensor) -> None:
        self.chosen.setdefault(layer, set()).update(ids.flatten().tolist())


def dense_bytes(model) -> tuple[int, int]:
    """(bytes of the main model's weights outside the routed experts and the embeddings, bytes of one
    embedding row). Routed experts live in the expert store, not in the modules' state. Tied embeddings
    are read whole, as the lm_head."""
    total, row, seen = 0, 0, set()
    for name, tensor in model.state_dict().items():
        if name.startswith("mtp.") or tensor.data_ptr() in seen:  # a tied lm_head is the embedding table
            continue
        seen.add(tensor.data_ptr())
        if "embed_tokens" in name and not model.config.tie_word_embeddings:
            row += tensor.nbytes // tensor.shape[0]
        else:
            total += tensor.nbytes
    return total, row


def read_bandwidth() -> tuple[float, float]:
    """GB/s of reading memory far larger than the caches: a torch sum over 1 GiB (fp32) and our one-row
    4-bit product over a [131072, 8192] matrix (512 MiB of codes), the best of 5 each."""
    def best(fn, nbytes: int) -> float:
        fn()
        fastest = min(timed_once(fn) for _ in range(5))
        return nbytes / fastest / 1e9

    def timed_once(fn) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    buffer = torch.ones(2**28)
    summed = best(lambda: buffer.sum(), buffer.nbytes)
    buffer = None  # the GiB goes before the next probe
    packed = torch.randint(0, 256, (131072, 4096), dtype=torch.uint8)
    scale, minimum = torch.full((131072, 128), 0.01).half(), torch.zeros(131072, 128).half()
    x = torch.randn(1, 8192).bfloat16()
    kernel = 0.0
    if cpu_kernels.library() is not None:
        kernel = best(lambda: cpu_kernels.linear_q4(x, packed, scale, minimum),
                      packed.nbytes + scale.nbytes + minimum.nbytes)
    return summed, kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder [default: the embedded demo model]")
    parser.add_argument("--cpu-mem", help="memory budget (experts beyond it are read from disk)")
    parser.add_argument("--max-rows", type=int, default=4, help="largest T = N + 1 to time")
    parser.add_argument("--context", type=int, default=256, help="prompt positions before the timed passes")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--acceptance", default="0.66,0.30,0.17",
                        help="acceptance rate at each draft position (the demo model's, N=3 run)")
    args = parser.parse_args()
    acceptance = [float(a) for a in args.acceptance.split(",")]
    if args.model:
        for shard in Path(args.model).glob("*.safetensors"):
            drop_cached_pages(shard)
    engine = qwen3next.load(args.model, cpu_mem=args.cpu_mem, router_stats=False, quiet=True)
    model = engine.model
    bandwidths = read_bandwidth()  # after the load: on the threads the engine set
    if model.mtp is None:
        raise SystemExit(f"{args.model}: no MTP head (mtp.*) to draft with")
    store_cache = getattr(engine.expert_store, "cache", None)
    disk = store_cache is not None and not store_cache.complete
    cache = model.make_cache(args.context + 4 * args.rounds * args.max_rows + 64)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    rule = GreedyRule(Sampler(SamplingParams(temperature=0.0)))
    with torch.inference_mode():
        hidden = model.hidden_states(prompt, cache)
        drafter = Drafter(model, cache)
        drafter.feed(hidden[:, :-1], prompt[0, 1:].tolist(), 0)
        print(f"model: {args.model or 'demo'} | experts {'from disk, cpu-mem ' + args.cpu_mem if disk else 'resident'}"
              f" | compute: {engine.compute} | one pass shares its calls: "
              f"{model.rows_stand_alone(hidden[:, :2])}", flush=True)
        expert_nbytes = {layer: source.nbytes for layer, source in store_cache.sources.items()} if store_cache else {}
        recorder, touched = DistinctExperts(), {}  # touched[T]: bytes a pass of T positions reads once
        existing = next((m.observer for m in model.modules() if isinstance(m, SparseMoE)), None)
        set_routing_observer(model, RoutingObservers(existing, recorder))
        dense, embedding_row = dense_bytes(model)
        times: dict[str, list[float]] = {}
        disk_bytes: dict[str, list[int]] = {}
        in_c: dict[str, list[float]] = {}
        c_seconds = [0.0]  # the C library's calls, timed one by one (none on the torch fallback)
        if cpu_kernels.library() is not None:
            cpu_kernels._lib = TimedLibrary(cpu_kernels.library(), c_seconds)

        def timed(name: str, run) -> None:
            before, c_before = store_cache.counters.disk_bytes if disk else 0, c_seconds[0]
            started = time.perf_counter()
            run()
            times.setdefault(name, []).append(time.perf_counter() - started)
            in_c.setdefault(name, []).append(c_seconds[0] - c_before)
            disk_bytes.setdefault(name, []).append((store_cache.counters.disk_bytes if disk else 0) - before)

        def verify(rows: int):
            def run():
                position = cache.position
                ids = torch.randint(0, model.config.vocab_size, (1, rows))
                recorder.chosen.clear()
                _, _, states = model.decode_steps(ids, cache)
                cache.rewind(position + 1, states[0])  # the pass's first position stays: the cache grows by one
                experts = sum(len(chosen) * expert_nbytes[layer] for layer, chosen in recorder.chosen.items()
                              if layer in expert_nbytes)
                touched.setdefault(rows, []).append(dense + rows * embedding_row + experts)
            return run

        def step():
            model(torch.randint(0, model.config.vocab_size, (1, 1)), cache)

        def draft():
            lengths = [kv.length for kv in cache.mtp]
            drafter.draft(hidden[:, -1:], [int(prompt[0, -1])], args.context - 1, 1, rule, None)
            for kv, length in zip(cache.mtp, lengths):  # the fed position too: every timed draft is the same
                kv.restore(length)

        for round_ in range(args.rounds + 2):  # the first two rounds warm up
            for name, run in [("step", step), ("draft", draft)] + [(f"T={t}", verify(t)) for t in
                                                                      range(1, args.max_rows + 1)]:
                timed(name, run)
            if round_ < 2:
                times.clear()
                disk_bytes.clear()
                in_c.clear()
    bandwidth = max(bandwidths)
    measures = bool(expert_nbytes)
    print(f"read bandwidth {bandwidth:.1f} GB/s (torch sum {bandwidths[0]:.1f}, 4-bit product "
          f"{bandwidths[1]:.1f}) | dense weights {dense / 2**20:.1f} MiB"
          + (f", one expert {next(iter(expert_nbytes.values())) / 2**20:.2f} MiB" if measures else
             " | routed experts not in an expert cache: no bytes-touched column"))
    base = statistics.median(times["step"])
    draft_ratio = statistics.median(times["draft"]) / base
    print(f"one decode step {base * 1e3:.1f} ms ({statistics.median(in_c['step']) * 1e3:.2f} in C) | "
          f"one head draft step {draft_ratio:.2f} steps")
    print(f"{'T':>3} | {'ms / pass':>9} | {'ms in C':>7} | {'in steps':>8} | {'speed-up at the acceptance given':>32}"
          + (" | MiB touched | read ms | over the read" if measures else "") + (" | disk MiB / pass" if disk else ""))
    for rows in range(1, args.max_rows + 1):
        seconds = statistics.median(times[f"T={rows}"])
        ratio, n = seconds / base, rows - 1
        tokens = 1 + sum(acceptance[:n])
        implied = tokens / (ratio + n * draft_ratio) if n else 1.0
        c = statistics.median(in_c[f"T={rows}"])
        line = f"{rows:>3} | {seconds * 1e3:>9.1f} | {c * 1e3:>7.2f} | {ratio:>8.2f} | {implied:>31.2f}x"
        if measures:
            nbytes = statistics.median(touched[rows])
            read = nbytes / (bandwidth * 1e9)
            line += f" | {nbytes / 2**20:>11.1f} | {read * 1e3:>7.1f} | {seconds / read:>13.2f}"
        if disk:
            line += f" | {statistics.median(disk_bytes[f'T={rows}']) / 2**20:>15.1f}"
        print(line)
    if disk:
        print(f"disk MiB per plain step {statistics.median(disk_bytes['step']) / 2**20:.1f}")


if __name__ == "__main__":
    main()
