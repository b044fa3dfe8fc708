"""Shared by the tokenizer, streaming, generation-API and generate-CLI tests: tiny tokenizers
trained here (byte-level BPE with `tokenizers`, SentencePiece with its trainer), tiny random
MLX models on their vocabulary, and a logits processor that forces a chosen token sequence."""

from __future__ import annotations

import io
import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from mlx_mobilellm.models import MobileLLM, MobileLLMConfig
from tiny_models import randomize_weights

# Text of every kind a tokenizer trips on; special tokens of the BPE below appear in some lines.
CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "digits 1234567 and 3.14159, 1,000,000; -42 +7 x2 2x",
    "def add(a, b):\n    return a + b  # sum\n",
    "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    "    four leading spaces",
    "trailing spaces   ",
    "a  b   c    d\ttabs\t\there",
    "line one\nline two\n\nline four\r\nwindows\r\n",
    "emoji 🦙🦙 and 👍🏽! 🎉",
    "CJK 你好，世界。日本語のテキスト",
    "accents: café, naïve, déjà vu, Ærøskøbing, ñandú",
    "Ελληνικά и русский текст",
    "It's, we'll, I'VE, they'd, YOU'RE",
    'JSON {"key": [1, 2, 3], "nested": {"a": null}}',
    "!!!??? ... --- *** ~~~ $$$ ^^ || <=> +=",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|eot|>after the end<|bos|>",
]
# Text the tiny tokenizers learn from: the corpus plus a few KB of prose and code (this file).
TRAINING_TEXT = CORPUS * 3 + Path(__file__).read_text(encoding="utf-8").splitlines()

BOS, EOT, IM_START, IM_END = "<|bos|>", "<|eot|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOT, IM_START, IM_END]

# ChatML as SmolLM2 writes it, with the BOS token first and a default system message.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@lru_cache(maxsize=4)
def _bpe_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    bos = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)])
    return tokenizer.to_str()


def bpe_tokenizer(vocab_size: int = 320):
    """A byte-level BPE (GPT-2 / Llama-3 style) trained here, adding BOS like Llama 3."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_bpe_json(vocab_size))


def write_bpe_folder(folder: Path, *, vocab_size: int = 320, chat_template: Optional[str] = CHAT_TEMPLATE,
                     eos_token: str = IM_END, generation_eos: Sequence[str] = (IM_END, EOT)) -> Path:
    """tokenizer.json + tokenizer_config.json (bos/eos, chat template) + generation_config.json
    (a list of EOS ids), as a Hugging Face model folder has them."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = bpe_tokenizer(vocab_size)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS,
              "eos_token": eos_token, "model_max_length": 4096}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.token_to_id(BOS),
         "eos_token_id": [tokenizer.token_to_id(t) for t in generation_eos]}))
    return folder


@lru_cache(maxsize=4)
def sentencepiece_model(vocab_size: int = 512, model_type: str = "bpe") -> bytes:
    """A tiny SentencePiece model with byte fallback (Llama-2 / original MobileLLM style)."""
    import sentencepiece

    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT), model_writer=out, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, character_coverage=0.98, minloglevel=2)
    return out.getvalue()


def write_sentencepiece_folder(folder: Path, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(sentencepiece_model())
    if config:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> MobileLLM:
    """A random MLX MobileLLM in eval mode (random norm weights too)."""
    values = dict(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, hidden_dim=64,
                  vocab_size=vocab_size, max_seq_len=256, rope_base=10000.0)
    model = MobileLLM(MobileLLMConfig(**{**values, **overrides}))
    return randomize_weights(model, seed, scale=0.3)


def force_tokens(sequence: Sequence[int], prompt_len: int, seen: Optional[list] = None):
    """A logits processor that makes generated token i be sequence[i] (any sampler picks it);
    past the end of `sequence` the logits pass through unchanged. `seen` collects the token
    histories it was called with."""
    sequence = list(sequence)

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if seen is not None:
            seen.append(np.array(tokens).tolist())
        position = tokens.size - prompt_len
        if position >= len(sequence):
            return logits
        forced = mx.full(logits.shape, -1e9, dtype=logits.dtype)
        forced[..., sequence[position]] = 0.0
        return forced

    return process


def collect(responses: Iterable) -> tuple:
    """(concatenated text, token ids, list of responses) of a stream_generate run."""
    responses = list(responses)
    return "".join(r.text for r in responses), [r.token for r in responses], responses


def ids_of(array) -> List[int]:
    return [int(t) for t in np.array(array).reshape(-1)]
