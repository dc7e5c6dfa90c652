"""qwen3next against llama.cpp on the same checkpoints: prefill and decode tok/s side by side, alternating.

    python benchmarks/bench_llamacpp.py                              # hidden-512 model, bf16 / 8-bit / 4-bit
    python benchmarks/bench_llamacpp.py --sizes bench,real --rounds 3
    python benchmarks/bench_llamacpp.py --sizes demo --formats bf16 --prompt 16 --new 128   # the demo model

llama.cpp is the copy vendored in the PyPI sdist of llama-cpp-python (pinned below, so both sides of
a figure are reproducible from the package registries), built once with cmake for its tools only
(llama-bench, llama-quantize: 4.5 minutes on 2 cores here) and cached in --workdir with the checkpoints.
Per size (tests/checkpoints.py: "bench" is hidden 512, 8 layers, 64 experts top-8; "real" the real
widths with 4 layers) it writes one random bf16 checkpoint with a 4000-token vocabulary ("demo" takes
the shipped demo model instead), converts it with llama.cpp's own converter (the fixture tokenizer is Qwen2's byte-level BPE, whose pre-tokenizer
the converter's hash table does not know: it is named explicitly) to BF16, Q8_0 and Q4_0, and
quantizes it with ours to 8 bits and to 4 bits twice: the default policy (attention, DeltaNet and
shared experts at 8 bits) and every matrix at 4 bits (Q4_0's bytes per token). Then for --rounds
rounds it runs `llama-bench -p P -n N` and ours (benchmarks/bench_engine.py's measurement, in its own
process) one after the other, and prints each side's best figures and their ratios, and the median of the
ratios within each round (the steadier figure when the machine's load moves between rounds). Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SDIST = "llama-cpp-python==0.3.36"  # vendors llama.cpp commit 0c1e570
VOCAB = 4000
DEMO = ROOT / "qwen3next" / "demo_model"  # --sizes demo: the shipped model itself (trained weights, vocabulary 6144)
# ours: (label, quantize arguments or None for the bf16 folder itself); theirs: the GGUF type to compare with
FORMATS = {
    "bf16": (None, "BF16"),
    "8-bit": (["--bits", "8"], "Q8_0"),
    "4-bit default policy": (["--bits", "4"], "Q4_0"),
    "4-bit every matrix": (["--bits", "4", "--bits-for", "*.weight=4"], "Q4_0"),
}


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode:
        sys.exit(f"failed: {' '.join(map(str, command))}\n{done.stderr[-4000:]}")
    return done


def build_llamacpp(work: Path, jobs: int) -> tuple[Path, Path]:
    """The vendored source tree and the directory of the built tools (built once)."""
    source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"), None)
    if source is None:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(work)])
        with tarfile.open(next(work.glob("llama_cpp_python-*.tar.gz"))) as archive:
            archive.extractall(work, filter="data")
        source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
    build, tools = work / "llamacpp-build", work / "llamacpp-build" / "bin"
    if not (tools / "llama-bench").exists():
        print(f"building llama.cpp's tools in {build} (minutes)", file=sys.stderr)
        run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
             "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"])
        run(["cmake", "--build", str(build), "--target", "llama-bench", "llama-quantize", "-j", str(jobs)])
    return source, tools


CONVERT = """
import sys
source, folder, out = sys.argv[1:4]
sys.path[:0] = [source, source + "/gguf-py"]
import conversion
import convert_hf_to_gguf
conversion.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"  # the fixture's pre-tokenizer
sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", "bf16", "--no-mtp"]  # written without one
convert_hf_to_gguf.main()
"""


def checkpoints(work: Path, size: str, labels: list[str], source: Path,
                tools: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Ours and the GGUF file for each format in `labels` (each written once), from one bf16 folder."""
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import write_model

    folder = DEMO if size == "demo" else work / f"{size}-bf16"
    if not folder.exists():  # written under a temporary name, renamed when complete
        partial = work / f"{size}-bf16.partial"
        shutil.rmtree(partial, ignore_errors=True)
        write_model(partial, size, seed=0, dtype=torch.bfloat16, max_shard_bytes=2 * 2**30, vocab_size=VOCAB, mtp=False)
        partial.rename(folder)
    ours = {}
    for label in labels:
        quantize = FORMATS[label][0]
        ours[label] = folder if quantize is None else work / f"{size}-{label.replace(' ', '-')}"
        if quantize is not None and not (ours[label] / "config.json").exists():
            run([sys.executable, "-m", "qwen3next", "quantize", str(folder), str(ours[label]), "-q", *quantize])
    gguf = {"BF16": work / f"{size}-BF16.gguf"}
    if not gguf["BF16"].exists():
        run([sys.executable, "-c", CONVERT, str(source), str(folder), str(gguf["BF16"]) + ".partial"])
        Path(str(gguf["BF16"]) + ".partial").rename(gguf["BF16"])
    for kind in {FORMATS[label][1] for label in labels} - {"BF16"}:
        gguf[kind] = work / f"{size}-{kind}.gguf"
        if not gguf[kind].exists():
            run([str(tools / "llama-quantize"), str(gguf["BF16"]), str(gguf[kind]) + ".partial", kind])
            Path(str(gguf[kind]) + ".partial").rename(gguf[kind])
    return ours, gguf


def theirs(tools: Path, model: Path, args) -> dict:
    done = run([str(tools / "llama-bench"), "-m", str(model), "-t", str(args.threads), "-p", str(args.prompt),
                "-n", str(args.new), "-r", "2", "-o", "json"])
    rows = json.loads(done.stdout)
    prefill = next(r["avg_ts"] for r in rows if r["n_prompt"] and not r["n_gen"])
    decode = next(r["avg_ts"] for r in rows if r["n_gen"] and not r["n_prompt"])
    return {"prefill_tok_s": prefill, "decode_tok_s": decode}


def ours(model: Path, args) -> dict:
    done = run([sys.executable, str(ROOT / "benchmarks" / "bench_engine.py"), "--impl", "qwen3next", "--model",
                str(model), f"--prompt-tokens={args.prompt}", f"--new-tokens={args.new}", f"--threads={args.threads}",
                "--repeats=2"])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/q3n-llamacpp"),
                        help="where llama.cpp is built and the checkpoints are written (outside the repository)")
    parser.add_argument("--sizes", default="bench",
                        help="tests/checkpoints.py sizes, or demo (the shipped model), comma-separated")
    parser.add_argument("--formats", default=",".join(FORMATS), help="of: " + ", ".join(FORMATS))
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens (llama-bench -p)")
    parser.add_argument("--new", type=int, default=64, help="new tokens (llama-bench -n)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each side; the best counts")
    args = parser.parse_args()
    labels = args.formats.split(",")
    unknown = [label for label in labels if label not in FORMATS]
    if unknown:
        parser.error(f"--formats: unknown {unknown}; choose from {list(FORMATS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    source, tools = build_llamacpp(args.workdir, args.threads)
    print(f"prompt {args.prompt} tokens, {args.new} new tokens, {args.threads} threads, best of {args.rounds} rounds")
    print(f"{'checkpoint':<30} {'ours prefill':>12} {'theirs':>8} {'ratio':>6} | {'ours decode':>11} {'theirs':>8} "
          f"{'ratio':>6}")
    for size in args.sizes.split(","):
        folders, gguf = checkpoints(args.workdir, size, labels, source, tools)
        for label in labels:
            kind = FORMATS[label][1]
            best = {"ours": {}, "theirs": {}}
            ratios: dict[str, list[float]] = {"prefill_tok_s": [], "decode_tok_s": []}  # each round's own pair
            for _ in range(args.rounds):
                round_figures = {}
                for side, figures in (("theirs", lambda: theirs(tools, gguf[kind], args)),
                                      ("ours", lambda: ours(folders[label], args))):
                    round_figures[side] = figures()
                    for key, value in round_figures[side].items():
                        best[side][key] = max(value, best[side].get(key, 0.0))
                for key in ratios:
                    ratios[key].append(round_figures["ours"][key] / round_figures["theirs"][key])
            o, t = best["ours"], best["theirs"]
            print(f"{size + ' ' + label + ' / ' + kind:<30} {o['prefill_tok_s']:>12.1f} {t['prefill_tok_s']:>8.1f} "
                  f"{o['prefill_tok_s'] / t['prefill_tok_s']:>5.2f}x | {o['decode_tok_s']:>11.1f} "
                  f"{t['decode_tok_s']:>8.1f} {o['decode_tok_s'] / t['decode_tok_s']:>5.2f}x | median of the rounds' "
                  f"ratios: prefill {statistics.median(ratios['prefill_tok_s']):.2f}x, decode "
                  f"{statistics.median(ratios['decode_tok_s']):.2f}x", flush=True)


if __name__ == "__main__":
    main()
