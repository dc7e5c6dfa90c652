"""A model larger than its memory budget: our decode speed against transformers + accelerate disk offload.

    python benchmarks/bench_peers.py --workdir /tmp/q3n-peers --cpu-mem 4G --delete

What a user without this project would run for a model that does not fit: transformers'
`Qwen3NextForCausalLM.from_pretrained(folder, device_map="auto", max_memory={"cpu": BUDGET},
offload_folder=...)`, which lets accelerate keep what fits the budget in RAM and offload the rest to
disk (accelerate is a benchmark-only dependency: `pip install accelerate`; the project does not need
it). Against it, on the same checkpoint and the same budget: `qwen3next.load(folder, cpu_mem=BUDGET)`
on the bf16 folder, and on its 4-bit quantization (`quantize_checkpoint`, the default policy).

The checkpoint (tests/checkpoints.py size "real": hidden 2048, 512 experts of 512 top-10, 16/2
attention heads of 256, 16/32 linear heads of 128, the real 151,936-token vocabulary) has --layers
layers (default 4: 3 DeltaNet + 1 attention, ~13 GB in bf16) and no MTP layer (transformers does not
load it, and decode does not read it). It is written in the Hugging Face layout, seeded, once into
--workdir (outside the repository), quantized once, and deleted afterwards with --delete.

Each side runs in its own process, so the peak RSS printed (VmHWM) is its own. Before the load and
again before the decode (after the load has read the checkpoint, and accelerate has written its
offload folder), the files the side reads are dropped from the page cache, so the decode reads the
disk, not RAM; the page-cache bytes of those files when the decode ends are printed too (pages the
kernel kept are RAM the budget does not count). A short greedy decode: --prompt-tokens token ids,
--new-tokens new ones; decode tok/s counts the tokens after the first (the first ends the prefill).
The two bf16 sides must produce the same greedy tokens (both compute in bf16); where they do not,
the first differing step and each side's logit gap between the two candidates are printed.

A budget too small for a side's always-active weights makes `load` refuse; that row reads "refused"
with the reason, and the others still run.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_engine import prompt_ids  # noqa: E402
from bench_quant import folder_bytes  # noqa: E402

from qwen3next.offload.budget import parse_size  # noqa: E402
from qwen3next.offload.disk import drop_cached_pages  # noqa: E402

# --sides: the row each prints, and the child's extra flags
SIDES = {"transformers": ("transformers+accelerate bf16", ["--save-logits"]),
         "transformers-cold": ("  same, pages dropped each token", ["--cold"]),
         "bf16": ("qwen3next bf16", ["--save-logits"]), "q4": ("qwen3next 4-bit", [])}


def model_files(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in sorted(folder.rglob("*")) if p.is_file()]


def drop_pages(files: list[Path]) -> None:
    for path in files:
        drop_cached_pages(path)


def cached_bytes(files: list[Path]) -> int:
    """Bytes of `files` in the page cache now (mincore); 0 where the platform has no mincore."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if not hasattr(libc, "mincore"):
        return 0
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page, total = mmap.PAGESIZE, 0
    for path in files:
        size = path.stat().st_size
        if not size:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if address in (None, ctypes.c_void_p(-1).value):
                continue
            vector = ctypes.create_string_buffer(-(-size // page))
            if libc.mincore(ctypes.c_void_p(address), size, vector) == 0:
                total += sum(b & 1 for b in vector.raw) * page
            libc.munmap(ctypes.c_void_p(address), size)
        finally:
            os.close(fd)
    return min(total, sum(p.stat().st_size for p in files))


def peak_rss() -> int:
    """This process's own peak RSS in bytes (VmHWM: not the parent's, which ru_maxrss can carry over exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def reset_peak_rss() -> bool:
    """Restart VmHWM from the current RSS (Linux: clear_refs 5), so the decode's peak is told from the load's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class AnonymousPeak:
    """The peak of RssAnon (Linux), sampled every 20 ms on a thread: the part of RSS that is not file pages
    mapped from the checkpoint (which the kernel can reclaim), so what a budget must really hold."""

    def __init__(self):
        self.peak = 0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        status = Path("/proc/self/status")
        while status.exists():
            line = next((x for x in status.read_text().splitlines() if x.startswith("RssAnon:")), None)
            if line is None:
                return
            self.peak = max(self.peak, int(line.split()[1]) * 1024)
            time.sleep(0.02)

    def take(self) -> int:
        """The peak since the last take (0 where not sampled); the next phase starts from zero."""
        peak, self.peak = self.peak, 0
        return peak


ANONYMOUS = None  # an AnonymousPeak in a child process


# --- the child processes: one side each, a JSON line on stdout ---

def run_transformers(folder: Path, args) -> dict:
    """accelerate's disk offload under the budget: the weights beyond max_memory go to offload_folder.
    With --cold, the files' pages are dropped again after every token (outside the timing)."""
    import transformers

    offload = args.workdir / "accelerate-offload"
    shutil.rmtree(offload, ignore_errors=True)
    drop_pages(model_files(folder))
    started = time.perf_counter()
    model = transformers.Qwen3NextForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": parse_size(args.cpu_mem, "--cpu-mem")},
        offload_folder=offload).eval()
    load_seconds = time.perf_counter() - started
    placed: dict[str, int] = {}
    for device in getattr(model, "hf_device_map", {"": "cpu"}).values():  # absent when all of it fits
        placed[str(device)] = placed.get(str(device), 0) + 1
    files = model_files(folder, offload)
    steps: list[float] = []  # when each new token's logits were ready, less the time spent dropping pages before
    dropping = [0.0]

    def clock(input_ids, scores):  # a logits processor: called once per new token, after its forward
        now = time.perf_counter()
        steps.append(now - dropping[0])
        if args.cold:
            drop_pages(files)
            dropping[0] += time.perf_counter() - now
        return scores

    ids = torch.tensor([prompt_ids(args.prompt_tokens, 500)])
    figures = {"load_seconds": load_seconds, "offload_gb": sum(p.stat().st_size for p in model_files(offload)) / 1e9,
               "device_map": placed, **start_decode(files)}
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                             pad_token_id=0, logits_processor=transformers.LogitsProcessorList([clock]),
                             output_logits=True, return_dict_in_generate=True)
    if args.save_logits:
        torch.save(torch.cat(out.logits).float(), args.workdir / "transformers-logits.pt")
    tok_s = (len(steps) - 1) / (steps[-1] - steps[0]) if len(steps) > 1 else 0.0
    return {**figures, **end_decode(files, out.sequences[0, ids.shape[1]:].tolist(), tok_s)}


def start_decode(files: list[Path]) -> dict:
    """Between the load and the decode: the load's peak RSS, then the files' pages dropped and the peak reset."""
    figures = {"load_peak_rss": peak_rss(), "load_peak_anon": ANONYMOUS.take()}
    drop_pages(files)
    figures["peak_reset"] = reset_peak_rss()
    return figures


def end_decode(files: list[Path], tokens: list[int], tok_s: float) -> dict:
    return {"tokens": tokens, "decode_tok_s": tok_s, "decode_peak_rss": peak_rss(), "decode_peak_anon": ANONYMOUS.take(),
            "cached_bytes": cached_bytes(files)}


def run_ours(folder: Path, args) -> dict:
    import qwen3next
    from qwen3next.errors import RequestError

    files = model_files(folder)
    drop_pages(files)
    started = time.perf_counter()
    try:
        engine = qwen3next.load(folder, cpu_mem=args.cpu_mem, router_stats=False, quiet=True)
    except RequestError as refused:  # a budget too small for the always-active weights
        if refused.field != "cpu_mem":
            raise
        return {"refused": str(refused)}
    figures = {"load_seconds": time.perf_counter() - started,
               "plan": engine.plan.summary() if engine.plan is not None else "resident", **start_decode(files)}
    engine.eos_ids = []  # always the full count, like min_new_tokens on the transformers side
    prompt = prompt_ids(args.prompt_tokens, 500)
    result = engine.complete(qwen3next.Request(prompt=prompt, max_new_tokens=args.new_tokens, temperature=0))
    figures.update(end_decode(files, result.tokens, result.timings.decode_tokens_per_second))
    if args.save_logits:  # each step's logits, for the comparison with transformers: the decode replayed
        torch.save(decode_logits(engine, prompt, result.tokens), args.workdir / "ours-logits.pt")
    engine.close()
    return figures


def decode_logits(engine, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab]: the logits each new token was chosen from, as generate_ids computes them."""
    from qwen3next.generate import prefill

    model, device = engine.model, engine.device
    cache = model.make_cache(engine.context_length)
    steps = [prefill(model, torch.tensor([prompt], device=device), cache)]
    for token in tokens[:-1]:
        with torch.inference_mode():
            steps.append(model(torch.tensor([[token]], device=device), cache)[0, -1])
    return torch.stack(steps).float()


def run_quantize(src: Path, out: Path) -> dict:
    from qwen3next.quant.convert import quantize_checkpoint
    from qwen3next.quant.policy import Policy

    started = time.perf_counter()
    quantize_checkpoint(src, out, Policy(4), force=True, progress=False, say=lambda m: None)
    return {"seconds": time.perf_counter() - started, "peak_rss": peak_rss()}


# --- the parent: write, quantize, run each side, compare ---

def checkpoint(workdir: Path, size: str, layers: int) -> Path:
    from checkpoints import write_model

    folder = workdir / f"bf16-{size}-{layers}layers"
    if not (folder / "config.json").exists():
        print(f"writing {folder} ({shutil.disk_usage(workdir).free / 1e9:.0f} GB free)", file=sys.stderr)
        partial = folder.with_suffix(".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_model(partial, size, seed=0, dtype=torch.bfloat16, max_shard_bytes=2 * 2**30, vocab_size=151936,
                    mtp=False, num_hidden_layers=layers)
        partial.rename(folder)
    return folder


def child(args, *extra: str) -> dict:
    command = [sys.executable, __file__, "--workdir", str(args.workdir), "--cpu-mem", args.cpu_mem,
               f"--prompt-tokens={args.prompt_tokens}", f"--new-tokens={args.new_tokens}", *extra]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # stderr passes through: progress, warnings
    if done.returncode:
        sys.exit(f"{' '.join(extra)} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def first_difference(reference: list[int], ours: list[int], workdir: Path) -> str:
    """The first step the greedy tokens differ at, with each side's logit gap between the two candidates."""
    step = next((i for i, (a, b) in enumerate(zip(reference, ours)) if a != b), None)
    if step is None:
        return "same greedy tokens" if len(reference) == len(ours) else "different lengths"
    a, b = reference[step], ours[step]
    theirs = torch.load(workdir / "transformers-logits.pt")[step]
    mine = torch.load(workdir / "ours-logits.pt")[step]
    return (f"greedy tokens differ first at new token {step}: transformers {a}, ours {b}; logit gap "
            f"(logit[{a}] - logit[{b}]): transformers {theirs[a] - theirs[b]:+.4f}, ours {mine[a] - mine[b]:+.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="where the checkpoints go (outside the repo)")
    parser.add_argument("--size", default="real", help="tests/checkpoints.py size (real; tiny for a quick check)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--cpu-mem", default="4G", help="the RAM budget of every side")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES),
                        help="the sides to run; the others' last figures are read from --workdir")
    parser.add_argument("--delete", action="store_true", help="delete the checkpoints afterwards")
    parser.add_argument("--child", choices=["transformers", "ours", "quantize"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--save-logits", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        global ANONYMOUS
        ANONYMOUS = AnonymousPeak()
        figures = {"transformers": lambda: run_transformers(args.model, args), "ours": lambda: run_ours(args.model, args),
                   "quantize": lambda: run_quantize(args.model, args.out)}[args.child]()
        print(json.dumps(figures))
        return

    args.workdir = args.workdir.resolve()
    if args.workdir.is_relative_to(ROOT):
        sys.exit(f"--workdir {args.workdir} is inside the repository; put the checkpoints outside it")
    args.workdir.mkdir(parents=True, exist_ok=True)
    bf16 = checkpoint(args.workdir, args.size, args.layers)
    q4 = bf16.with_name(bf16.name.replace("bf16", "q4"))
    try:
        if not (q4 / "config.json").exists():
            print(f"quantizing to {q4}", file=sys.stderr)
            done = child(args, "--child", "quantize", "--model", str(bf16), "--out", str(q4))
            print(f"quantized in {done['seconds']:.0f} s, peak RSS {done['peak_rss'] / 2**30:.2f} GiB", file=sys.stderr)
        saved = args.workdir / "results.json"  # each side's last figures: --sides reruns some, reports all
        setup = {k: str(getattr(args, k)) for k in ("size", "layers", "cpu_mem", "prompt_tokens", "new_tokens")}
        last = json.loads(saved.read_text()) if saved.exists() else {}
        rows = last.get("rows", {}) if last.get("setup") == setup else {}
        for side in args.sides:
            name, extra = SIDES[side]
            model = str(q4 if side == "q4" else bf16)
            try:
                kind = "transformers" if side.startswith("transformers") else "ours"
                rows[name] = child(args, "--child", kind, "--model", model, *extra)
            finally:
                shutil.rmtree(args.workdir / "accelerate-offload", ignore_errors=True)
            saved.write_text(json.dumps({"setup": setup, "rows": rows}))
        rows = {name: rows[name] for name, _ in SIDES.values() if name in rows}
        report(rows, args, folder_bytes(bf16), folder_bytes(q4))
    finally:
        if args.delete:
            for folder in (bf16, q4):
                shutil.rmtree(folder, ignore_errors=True)
            for name in ("transformers-logits.pt", "ours-logits.pt", "results.json"):
                (args.workdir / name).unlink(missing_ok=True)


def report(rows: dict[str, dict], args, bf16_bytes: int, q4_bytes: int) -> None:
    print(f"\n{args.size} widths, {args.layers} layers: bf16 {bf16_bytes / 1e9:.2f} GB, 4-bit {q4_bytes / 1e9:.2f} GB; "
          f"--cpu-mem {args.cpu_mem} for every side; greedy, {args.prompt_tokens} prompt tokens, "
          f"{args.new_tokens} new; page cache dropped before the load and before the decode")
    reference = rows.get(SIDES["transformers"][0])
    print(f"{'':<34} {'decode':>8} {'vs':>10}  {'peak RSS GiB (anonymous)':^28} {'page-':>7} {'load':>6}")
    print(f"{'':<34} {'tok/s':>8} {'accelerate':>10}  {'load':^13} {'decode':^14} {'cached GB':>7} {'s':>6}")
    for name, r in rows.items():
        if "refused" in r:
            print(f"{name:<34} refused  ({r['refused']})")
            continue
        ratio = f"{r['decode_tok_s'] / reference['decode_tok_s']:.1f}x" if reference else "-"
        decode_peak = r["decode_peak_rss"] / 2**30 if r["peak_reset"] else float("nan")
        print(f"{name:<34} {r['decode_tok_s']:>8.3f} {ratio:>10}  {r['load_peak_rss'] / 2**30:>5.2f} "
              f"({r['load_peak_anon'] / 2**30:>5.2f})  {decode_peak:>5.2f} ({r['decode_peak_anon'] / 2**30:>5.2f}) "
              f"{r['cached_bytes'] / 1e9:>9.2f} {r['load_seconds']:>6.1f}")
    if reference:
        print(f"accelerate placed modules: {reference['device_map']}; offload folder {reference['offload_gb']:.2f} GB")
        ours = rows.get(SIDES["bf16"][0], {"refused": ""})
        if "refused" not in ours:
            print(f"bf16 greedy tokens: {first_difference(reference['tokens'], ours['tokens'], args.workdir)}")
    for name, r in rows.items():
        if "plan" in r:
            print(f"{name.strip()}: {r['plan']}")


if __name__ == "__main__":
    main()
