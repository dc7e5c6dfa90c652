"""The library API: `load()` a model folder, then `generate()` tokens or score `logits()`.

The CLI is a thin shell over this; everything a user can do from the command line they can
do from Python with the same defaults.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import torch

from . import cpu_kernels
from .config import Qwen3NextConfig
from .errors import ContextLengthError, RequestError, UsageError
from .generate import StopStrings, generate_ids
from .loader import load_model
from .model_path import DEMO_NOTICE, resolve_model_path
from .moe import RoutingObservers, set_routing_observer
from .offload.budget import ExpertPlan
from .offload.placement import Placement, resolve_device
from .offload.router_stats import RouterStatistics
from .prefix_cache import SNAPSHOTS, PrefixStates
from .request import PREFILL_CHUNK, Request, Result, Token, Usage
from .sampling import Sampler, generation_defaults
from .tokenizer import Tokenizer


ROUTER_STATS_SAVE_SECONDS = 300.0


class Engine:
    """A loaded model with its tokenizer and generation defaults.

    `stream(request)` is the one generation call; `complete` and `generate` are thin layers on it.
    """

    def __init__(self, model, expert_store, tokenizer: Tokenizer, folder: Path,
                 router_stats: RouterStatistics | None = None, plan: ExpertPlan | None = None,
                 compute: str = ""):
        self.model = model
        self.compute = compute  # what runs the math, for --stats: "C kernels (avx512-vnni)", "torch fallback (...)"
        self.router_stats = router_stats
        self.plan = plan  # the memory split (None: a bf16 folder loaded whole, unplanned)
        self.expert_store = expert_store
        self.tokenizer = tokenizer
        self.folder = folder
        self.config = model.config
        self.sampling_defaults, eos_ids = generation_defaults(folder)
        self.eos_ids = eos_ids or self.config.eos_token_ids
        self.prefix_states: PrefixStates | None = None  # off: each call prefills its whole prompt

    def keep_prefix_states(self, limit: int = SNAPSHOTS) -> None:
        """Keep generation state between calls, as a server does for chat turns: a prompt that extends an
        earlier prompt (or prompt and reply) token for token prefills only its new tokens. `limit`
        snapshots are kept (each copies the DeltaNet states; prefix_cache.py); 0 turns it off. The kept
        state is one live cache, so streams must then run one at a time (the server's queue does)."""
        self.prefix_states = PrefixStates(lambda: self.model.make_cache(self.context_length), limit) if limit else None

    @property
    def device(self) -> torch.device:
        return self.model.model.norm.weight.device

    @property
    def context_length(self) -> int:
        """The model's context, or less when the memory plan reserved less."""
        return self.config.max_position_embeddings if self.plan is None else self.plan.max_context

    @property
    def prefill_chunk(self) -> int:
        """Prompt tokens per prefill step for requests that set none. Larger when experts come from disk:
        a chunk of 512 tokens already touches nearly every expert of a layer, so each chunk is one pass
        over the experts on disk and a long prompt should take few (docs/offload.md). The plan sized the
        chunk (OFFLOAD_PREFILL_CHUNK, at most the context) and reserved its working memory."""
        return self.plan.prefill_tokens if self.plan is not None and self.plan.prefill_tokens else PREFILL_CHUNK

    def prompt_ids(self, request: Request) -> list[int]:
        """The request's prompt as token ids: text through the tokenizer (or, with chat/system, through
        the chat template as one user message), messages always through the chat template (`system`
        first, `tools` rendered), token ids as they are."""
        if request.messages is not None or request.chat or request.system is not None:
            messages = list(request.messages or [{"role": "user", "content": request.prompt}])
            if request.system is not None:
                messages.insert(0, {"role": "system", "content": request.system})
            kwargs = {} if request.tools is None else {"tools": list(request.tools)}
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                            **kwargs))
        if isinstance(request.prompt, str):
            return self.tokenizer.encode(request.prompt)
        if any(t >= self.config.vocab_size for t in request.prompt):
            raise RequestError("prompt", "[...]", f"token ids must be below the vocabulary size {self.config.vocab_size}")
        return list(request.prompt)

    def _check_context(self, tokens: int, room: int) -> None:
        """Refuse inputs that leave fewer than `room` free positions in the context."""
        if tokens + room > self.context_length:
            raise ContextLengthError(
                f"the input is {tokens} tokens; the model's context (max_position_embeddings) is "
                f"{self.context_length}" + (", leaving no room to generate" if room else "")
            )

    def stream(self, request: Request) -> Iterator[Token | Result]:
        """Yield a Token per generated token, then one Result (text, ids, finish reason, usage, timings).

        Everything is checked before this returns: a bad request raises here, not mid-iteration.
        Closing the iterator early (a cancelled request) stops generation at the next token.
        """
        if not isinstance(request, Request):
            raise UsageError(f"stream() takes a qwen3next.Request, not {type(request).__name__}")
        params = self.sampling_defaults.updated(**request.sampling_overrides())
        if request.speculative and self.model.mtp is None:
            raise RequestError("speculative", request.speculative, "this checkpoint has no MTP head (mtp.*) to draft with")
        ids = self.prompt_ids(request)
        self._check_context(len(ids), room=1)
        return self._stream(ids, Sampler(params, request.seed), request)

    def complete(self, request: Request) -> Result:
        """Generate to the end and return the Result."""
        return next(event for event in self.stream(request) if isinstance(event, Result))

    def generate(self, prompt: str | Sequence[int] | list[dict], **fields) -> Iterator[Token]:
        """Yield new Tokens for `prompt` (text, token ids, or chat messages); `fields` are Request fields
        (max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop, chat, system, ...)."""
        key = "messages" if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt) \
            else "prompt"
        events = self.stream(Request(**{key: prompt}, **fields))
        return (event for event in events if isinstance(event, Token))

    def _stream(self, ids: list[int], sampler: Sampler, request: Request) -> Iterator[Token | Result]:
        result = Result(usage=Usage(prompt_tokens=len(ids)))
        detokenizer = self.tokenizer.detokenizer(skip_special_tokens=True)
        stops = StopStrings(request.stop)
        texts = []
        states = self.prefix_states
        kept, result.usage.cached_tokens = (None, 0) if states is None else states.start(ids)
        tokens = generate_ids(self.model, ids, sampler, request.max_new_tokens, self.eos_ids, self.context_length,
                              result.timings, request.prefill_chunk or self.prefill_chunk, kept,
                              result.usage.cached_tokens, request.speculative or 0)
        if self.router_stats is not None:
            self.router_stats.start_sequence()
        cache = getattr(self.expert_store, "cache", None)
        before = copy.copy(cache.counters) if cache is not None and not cache.complete else None
        for token, finish in tokens:
            if states is not None and not result.tokens:
                states.keep(ids)  # the end of the prompt: where the next turn's prompt goes on from
            piece = detokenizer.add(token) + (detokenizer.flush() if finish else "")
            text, stopped = stops.feed(piece)
            if finish and not stopped:
                text += stops.flush()
            result.tokens.append(token)
            texts.append(text)
            yield Token(token, text)
            if stopped:
                tokens.close()
                finish = "stop"
            if finish:
                result.finish_reason = finish
                break
        if states is not None and result.tokens:
            states.keep(ids + result.tokens[:-1])  # the end of the reply (its last token was never fed in)
        result.text = "".join(texts)
        result.usage.completion_tokens = len(result.tokens)
        if before is not None:
            result.experts = cache.counters.minus(before).figures(len(result.tokens))
        if self.router_stats is not None:
            self.router_stats.maybe_save(ROUTER_STATS_SAVE_SECONDS)  # a long-lived process saves now and then
        yield result

    def close(self) -> None:
        """Save the router statistics and stop the expert reads; the CLI calls this as it exits."""
        if self.router_stats is not None:
            self.router_stats.save()
        close = getattr(self.expert_store, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def logits(self, token_ids: Sequence[int], chunk: int = PREFILL_CHUNK) -> torch.Tensor:
        """Full-sequence logits [len(token_ids), vocab] in fp32, computed chunk by chunk."""
        if type(chunk) is not int or chunk < 1:
            raise RequestError("chunk", chunk, "must be an integer >= 1")
        ids = self.prompt_ids(Request(prompt=list(token_ids)))
        self._check_context(len(ids), room=0)
        cache = self.model.make_cache(self.context_length)
        tensor = torch.tensor([ids], device=self.device)
        if self.router_stats is not None:
            self.router_stats.start_sequence()
        outputs = []
        for start in range(0, len(ids), chunk):
            with torch.inference_mode():
                outputs.append(self.model(tensor[:, start : start + chunk], cache)[0].float())
        return torch.cat(outputs)


def device_from_flag(device: str | torch.device | None) -> torch.device:
    """The device asked for, checked before any weight is read (None: CUDA when available)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device!r}: not a device (use cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def load(
    path: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device | None = None,
    progress: bool = False,
    quiet: bool = False,
    cpu_mem: int | str | None = None,
    gpu_mem: int | str | None = None,
    max_context: int | None = None,
    expert_policy: str = "stats",
    router_stats: bool = True,
    prefetch: bool = False,
    threads: int | None = None,
) -> Engine:
    """Load a Qwen3-Next model folder (or a hub id already in the local Hugging Face cache).

    path None: the small demo model shipped in the package (a notice on stderr says so unless
    quiet). dtype: "bfloat16" (default), "float16", "float32" or a torch dtype. device: "cpu",
    "cuda", ...; None picks CUDA when available. cpu_mem / gpu_mem: memory budgets ("12G", bytes;
    None: what is free; gpu_mem 0: no GPU); under a budget smaller than the model, routed experts
    are cached in RAM and read from the checkpoint as needed (offload/placement.py). max_context:
    tokens the budget reserves KV cache for. expert_policy: the cache's eviction policy (lru, lfu,
    stats). router_stats: count routing into the per-model statistics cache (used for prefetch).
    prefetch: read the next layer's likely experts ahead when experts come from disk (off by default:
    as measured so far it costs more reads than it saves; docs/offload.md).
    threads: CPU threads for the kernels and torch's ops, for the whole process (torch.set_num_threads);
    None leaves torch's setting, which defaults to the physical cores.
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise RequestError("threads", threads, "must be a whole number >= 1")
        torch.set_num_threads(threads)
    placement = Placement(cpu_mem=cpu_mem, gpu_mem=gpu_mem, max_context=max_context, expert_policy=expert_policy,
                          prefetch=prefetch)
    folder = resolve_model_path(path)
    if path is None and not quiet:
        print(f"qwen3next: {DEMO_NOTICE}", file=sys.stderr)
    requested = None if device is None else device_from_flag(device)
    device = resolve_device(placement, requested) or device_from_flag(None)
    compute = cpu_kernels.prepare(quiet).describe() if device.type == "cpu" else f"torch on {device}"
    config = Qwen3NextConfig.from_file(folder)  # the cheap checks first: config, then tokenizer, then weights
    tokenizer = Tokenizer.from_folder(folder)
    statistics = RouterStatistics.for_model(folder, config) if router_stats else None
    model, store, plan = load_model(folder, dtype, device, progress=progress, config=config, placement=placement,
                                    statistics=statistics, quiet=quiet)
    set_routing_observer(model, RoutingObservers(statistics, getattr(store, "prefetcher", None)))
    return Engine(model, store, tokenizer, folder, statistics, plan, compute)
