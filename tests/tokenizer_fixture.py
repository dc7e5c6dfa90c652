"""A tiny Qwen-shaped tokenizer folder for tests: a byte-level BPE trained in milliseconds.

The files have the hub's shape (tokenizer.json with Qwen2's normalizer, split regex and
byte-level pre-tokenizer and decoder; tokenizer_config.json with the same keys the
Qwen3-Next hub file has), so both this package and transformers load them, and tests can
compare the two. Only the learned vocabulary is small: the Qwen added tokens follow it
directly instead of sitting at 151643.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# The Qwen2/Qwen3 added tokens, in id order (151643..151668 in the real vocabulary).
QWEN_SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]

# As on the hub, only the first 14 (<|endoftext|> .. <|video_pad|>) are marked special, so
# decode(skip_special_tokens=True) keeps <tool_call>, <think> and the rest.
_SPECIAL_COUNT = 14

# Qwen2's pre-tokenizer split (letters, single digits, punctuation runs, newlines, spaces).
_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The chat template of Qwen3-Next-80B-A3B-Instruct (the Qwen3 Instruct-2507 template), verbatim.
QWEN3_NEXT_CHAT_TEMPLATE: str = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""

# Enough varied text for a few hundred merges, with 2-, 3- and 4-byte UTF-8 characters so
# that rarer ones stay split across byte tokens.
_CORPUS = [
    "The lighthouse keeper wrote in his log every evening. The wind came from the west, "
    "the tide was low, and the lamp burned until morning. He counted the ships that passed "
    "and noted their colours, their flags and the time they rounded the point.",
    "In the market the baker sold bread, cakes and small pastries. The children watched the "
    "oven through the window while their parents talked about the weather and the harvest.",
    "A café in Zürich served crème brûlée, and the waiter, whose name was José, recommended "
    "the rösti with a glass of cold cider. Déjà vu, said the guest, naïve but happy.",
    "東京の朝は静かです。私はコーヒーを飲みながら新聞を読みます。北京和上海都是很大的城市，"
    "我们明天去图书馆看书。",
    "Good morning! 🌅 The weather is lovely today ☀️ and the garden is full of flowers 🌷🌻. "
    "We baked a cake 🎂 and everyone smiled 😊.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i, add(i, 2))\n",
    "Numbers like 3.14159, 2718 and 1,000,000 appear in tables; dates like 2024-05-17 too.",
    "She asked: \"Is it <b>bold</b> & 'quoted'?\" He answered that the tags were only text.",
]


def write_tokenizer_files(folder: Path, vocab_size: int = 512, corpus: list[str] | None = None) -> int:
    """Train the BPE on `corpus` (default: the built-in text) and write tokenizer.json and
    tokenizer_config.json into `folder`; returns the number of ids (learned + added tokens)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _train(vocab_size, corpus or _CORPUS)
    learned = tokenizer.get_vocab_size(with_added_tokens=False)
    tokenizer.add_tokens(
        [AddedToken(token, normalized=False, special=i < _SPECIAL_COUNT) for i, token in enumerate(QWEN_SPECIAL_TOKENS)]
    )
    (folder / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    config = _tokenizer_config(first_added_id=learned)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return learned + len(QWEN_SPECIAL_TOKENS)


def _train(vocab_size: int, corpus: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def _tokenizer_config(first_added_id: int) -> dict:
    """tokenizer_config.json as the Qwen3-Next hub repository ships it (ids shifted down)."""
    decoder = {
        str(first_added_id + i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": i < _SPECIAL_COUNT,
        }
        for i, token in enumerate(QWEN_SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": QWEN_SPECIAL_TOKENS[1:_SPECIAL_COUNT],
        "bos_token": None,
        "chat_template": QWEN3_NEXT_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 1010000,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
