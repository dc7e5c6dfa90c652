"""The library API: `load()` a model folder, then `generate()` tokens or score `logits()`.

The CLI is a thin shell over this; everything a user can do from the command line they can
do from Python with the same defaults.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .config import Qwen3NextConfig
from .errors import ContextLengthError, UsageError
from .generate import PREFILL_CHUNK, GenerationStats, StopStrings, generate_ids
from .loader import load_model
from .model_path import DEMO_NOTICE, resolve_model_path
from .sampling import Sampler, generation_defaults
from .tokenizer import Tokenizer


@dataclass
class Token:
    """One generated token: its id and the text it completed (may be "" mid-character or mid-stop-string)."""

    token: int
    text: str


class Engine:
    """A loaded model with its tokenizer and generation defaults."""

    def __init__(self, model, expert_store, tokenizer: Tokenizer, folder: Path):
        self.model = model
        self.expert_store = expert_store
        self.tokenizer = tokenizer
        self.folder = folder
        self.config = model.config
        self.sampling_defaults, eos_ids = generation_defaults(folder)
        self.eos_ids = eos_ids or self.config.eos_token_ids
        self.last_stats = GenerationStats()

    @property
    def device(self) -> torch.device:
        return self.model.model.norm.weight.device

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    def prompt_ids(self, prompt: str | Sequence[int] | list[dict], chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids for a text prompt (through the chat template with `chat` or `system`), a message
        list (always through the template; `system` is put first), or token ids (used as they are)."""
        if system is not None and not isinstance(system, str):
            raise UsageError("the system message must be text")
        if isinstance(prompt, str):
            if not prompt.strip():
                raise UsageError("the prompt is empty")
            if chat or system is not None:
                return self.prompt_ids([{"role": "user", "content": prompt}], system=system)
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise UsageError("the prompt is empty" if isinstance(prompt, (list, tuple)) else
                             "the prompt must be text, a list of token ids or a list of chat messages")
        if all(isinstance(m, dict) for m in prompt):
            messages = ([{"role": "system", "content": system}] if system is not None else []) + list(prompt)
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        if chat or system is not None:
            raise UsageError("chat and system apply to text prompts and message lists, not to token ids")
        if not all(type(t) is int and 0 <= t < self.config.vocab_size for t in prompt):
            raise UsageError(f"token ids must be ints in [0, {self.config.vocab_size})")
        return list(prompt)

    def _check_context(self, tokens: int, room: int) -> None:
        """Refuse inputs that leave fewer than `room` free positions in the context."""
        if tokens + room > self.context_length:
            raise ContextLengthError(
                f"the input is {tokens} tokens; the model's context (max_position_embeddings) is "
                f"{self.context_length}" + (", leaving no room to generate" if room else "")
            )

    def generate(
        self,
        prompt: str | Sequence[int] | list[dict],
        max_new_tokens: int = 256,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        chat: bool = False,
        system: str | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> Iterator[Token]:
        """Yield new tokens as they are produced. Unset sampling options come from generation_config.json.

        Stops at any eos id of generation_config.json, at a stop string (its text is not
        emitted), after max_new_tokens, or at the end of the context. `self.last_stats` holds
        the timing of the latest call.
        """
        _check_types(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                     repetition_penalty=repetition_penalty, seed=seed, prefill_chunk=prefill_chunk)
        if max_new_tokens < 0:
            raise UsageError(f"--max-new-tokens {max_new_tokens}: must be >= 0")
        if prefill_chunk < 1:
            raise UsageError(f"--prefill-chunk {prefill_chunk}: must be >= 1")
        stop = [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(s, str) for s in stop):
            raise UsageError("--stop: stop strings must be text")
        params = self.sampling_defaults.updated(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty
        )
        ids = self.prompt_ids(prompt, chat, system)
        self._check_context(len(ids), room=1)
        return self._stream(ids, Sampler(params, seed), max_new_tokens, stop, prefill_chunk)

    def _stream(self, ids, sampler, max_new_tokens, stop, prefill_chunk) -> Iterator[Token]:
        stats = self.last_stats = GenerationStats()
        detokenizer = self.tokenizer.detokenizer(skip_special_tokens=True)
        stops = StopStrings(stop)
        tokens = generate_ids(
            self.model, ids, sampler, max_new_tokens, self.eos_ids, self.context_length, stats, prefill_chunk
        )
        for token, last in tokens:
            piece = detokenizer.add(token) + (detokenizer.flush() if last else "")
            text, stopped = stops.feed(piece)
            if last and not stopped:
                text += stops.flush()
            yield Token(token, text)
            if stopped:
                stats.finish_reason = "stop"
                tokens.close()
                return

    def logits(self, token_ids: Sequence[int], chunk: int = PREFILL_CHUNK) -> torch.Tensor:
        """Full-sequence logits [len(token_ids), vocab] in fp32, computed chunk by chunk."""
        if type(chunk) is not int or chunk < 1:
            raise UsageError(f"chunk {chunk!r}: must be an int >= 1")
        ids = self.prompt_ids(list(token_ids))
        self._check_context(len(ids), room=0)
        cache = self.model.make_cache()
        tensor = torch.tensor([ids], device=self.device)
        outputs = []
        for start in range(0, len(ids), chunk):
            with torch.inference_mode():
                outputs.append(self.model(tensor[:, start : start + chunk], cache)[0].float())
        return torch.cat(outputs)


_INTEGER_OPTIONS = ("max_new_tokens", "top_k", "seed", "prefill_chunk")


def _check_types(**options) -> None:
    """Options arrive from Python and from JSON requests: a wrong type is a usage error, not a crash."""
    for name, value in options.items():
        if value is None:
            continue
        integer = name in _INTEGER_OPTIONS
        if type(value) is bool or not isinstance(value, int if integer else (int, float)):
            kind = "an integer" if integer else "a number"
            raise UsageError(f"--{name.replace('_', '-')} {value!r}: must be {kind}")


def _resolve_device(device: str | torch.device | None) -> torch.device:
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
) -> Engine:
    """Load a Qwen3-Next model folder (or a hub id already in the local Hugging Face cache).

    path None: the small demo model shipped in the package (a notice on stderr says so unless
    quiet). dtype: "bfloat16" (default), "float16", "float32" or a torch dtype. device: "cpu",
    "cuda", ...; None picks CUDA when available.
    """
    folder = resolve_model_path(path)
    if path is None and not quiet:
        print(f"qwen3next: {DEMO_NOTICE}", file=sys.stderr)
    device = _resolve_device(device)
    config = Qwen3NextConfig.from_file(folder)  # the cheap checks first: config, then tokenizer, then weights
    tokenizer = Tokenizer.from_folder(folder)
    model, store = load_model(folder, dtype, device, progress=progress, config=config)
    return Engine(model, store, tokenizer, folder)
