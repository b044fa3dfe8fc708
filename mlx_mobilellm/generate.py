"""Text generation on the decode loop (decode.py): streaming with stop strings, prompt-cache
reuse, speculative decoding with a draft model, and batches of prompts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from .cache import RotatingKVCache
from .decode import DecodeBatch, generate_step, pipelined, prefill, speculative_generate_step
from .detokenizer import TextStream
from .sampling import LogitsProcessor, check_seed, make_logits_processors, make_sampler
from .input_checks import check_text

MAX_DRAFT_TOKENS = 32
"""A draft is kept whole only when the model agrees with all of its tokens in a row: with the
model agreeing 90 % of the time, 32 drafted tokens are kept whole 3 % of the time, so a longer
draft only adds draft-model steps, and its verification call grows with it."""
Prompt = Union[str, Sequence[int]]


@dataclass
class GenerationResponse:
    text: str
    """The text this token added (may be empty while a character or a stop string is
    incomplete)."""
    token: Optional[int]
    prompt_tokens: int
    """Prompt tokens processed by this call (cached ones excluded)."""
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    """GB, as mx.get_peak_memory reports it."""
    finish_reason: Optional[str] = None
    """None while running, then "stop" (EOS or stop string) or "length"."""
    cached_tokens: int = 0
    logprobs: Optional[mx.array] = None
    """(vocab,) log-probabilities this token was drawn from (see Step.logprobs); lazy."""


@dataclass
class PromptCache:
    """A KV cache kept across calls (chat turns) with the token ids it holds, so the next
    prompt processes only what is new after their common prefix."""
    cache: list
    tokens: List[int] = field(default_factory=list)

    @classmethod
    def for_model(cls, model, max_kv_size: Optional[int] = None) -> "PromptCache":
        return cls(model.make_cache(max_kv_size))

    def common_prefix(self, prompt: List[int]) -> int:
        """How many of the prompt's first tokens the cache holds."""
        common = 0
        for cached, new in zip(self.tokens, prompt):
            if cached != new:
                break
            common += 1
        return common

    def reuse(self, prompt: List[int]) -> int:
        """Trim the cache to its common prefix with `prompt` and return that length; at least
        one prompt token is always left to process (it yields the first logits)."""
        common = min(self.common_prefix(prompt), len(prompt) - 1)
        surplus = self.cache[0].offset - common
        if surplus and not all(c.trimmable for c in self.cache):
            for layer in self.cache:  # a rotated cache cannot forget its last tokens: restart
                layer.reset()
            self.tokens = []
            return 0
        for layer in self.cache:
            layer.trim(surplus)
        self.tokens = self.tokens[:common]
        return common


def encode_prompt(tokenizer, prompt: Prompt, vocab_size: int) -> List[int]:
    """The prompt's token ids, each in [0, vocab_size): the embedding does not check its
    indices, and one past its end reads outside it (a crash, or garbage)."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(check_text(prompt, "the prompt"))
    else:
        ids = [int(t) for t in prompt]
    wrong = next((t for t in ids if not 0 <= t < vocab_size), None)
    if wrong is not None:
        raise ValueError(f"the prompt holds token id {wrong}, outside the model's vocabulary "
                         f"[0, {vocab_size})")
    return ids


def check_draft_model(model, draft_model, num_draft_tokens: int) -> None:
    """A draft model's tokens must be the model's: the model embeds what the draft proposes."""
    if not 1 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
        raise ValueError(f"num_draft_tokens must be in [1, {MAX_DRAFT_TOKENS}], got "
                         f"{num_draft_tokens}")
    ours, theirs = model.config.vocab_size, draft_model.config.vocab_size
    if ours != theirs:
        raise ValueError(f"the draft model has a vocabulary of {theirs} tokens and the model one "
                         f"of {ours}; a draft model must use the model's tokenizer")


def stream_generate(model, tokenizer, prompt: Prompt, max_tokens: int = 256, *,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                    min_p: float = 0.0, repetition_penalty: Optional[float] = None,
                    repetition_context_size: int = 20, seed: Optional[int] = None,
                    stop: Sequence[str] = (), eos_token_ids: Optional[Sequence[int]] = None,
                    logits_processors: Sequence[LogitsProcessor] = (),
                    prompt_cache: Optional[PromptCache] = None, max_kv_size: Optional[int] = None,
                    draft_model=None, num_draft_tokens: int = 3,
                    draft_stats: Optional[dict] = None) -> Iterator[GenerationResponse]:
    """Yield a GenerationResponse per generated token, the text streamed as it forms.

    prompt: text (encoded with the tokenizer, BOS as it specifies) or token ids.
    Stops at any EOS id (the tokenizer's and the model config's, or eos_token_ids), at a
    stop string (never emitted), or after max_tokens.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    ids = encode_prompt(tokenizer, prompt, model.config.vocab_size)
    if not ids:
        raise ValueError("the prompt is empty")
    context = model.config.max_seq_len
    if len(ids) >= context:
        raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {context}")
    if seed is not None:
        mx.random.seed(check_seed(seed))
    sampler = make_sampler(temperature, top_p, top_k, min_p)
    processors = [*make_logits_processors(repetition_penalty, repetition_context_size),
                  *logits_processors]
    eos = set(eos_token_ids if eos_token_ids is not None
              else [*tokenizer.eos_token_ids, *model.config.eos_token_ids])
    if prompt_cache is None:
        prompt_cache = PromptCache.for_model(model, max_kv_size)
    if draft_model is not None:
        check_draft_model(model, draft_model, num_draft_tokens)
        if any(isinstance(c, RotatingKVCache) for c in prompt_cache.cache):
            # A rotated cache cannot take back rejected draft tokens.
            raise ValueError("speculative decoding needs an unbounded KV cache; drop max_kv_size "
                             "(--max-kv-size) or the draft model")
    cached = prompt_cache.reuse(ids)
    new_prompt = mx.array(ids[cached:], dtype=mx.int32)
    max_tokens = min(max_tokens, context - len(ids))

    if draft_model is not None:
        if processors:
            raise ValueError("speculative decoding does not take logits processors "
                             "(repetition penalty)")
        draft_cache = draft_model.make_cache()
        if cached:
            prefill(draft_model, mx.array([ids[:cached]], dtype=mx.int32), draft_cache)
        steps = speculative_generate_step(model, draft_model, new_prompt, prompt_cache.cache,
                                          draft_cache, max_tokens=max_tokens, sampler=sampler,
                                          num_draft=num_draft_tokens, stats=draft_stats)
    else:
        steps = generate_step(model, new_prompt, prompt_cache.cache, max_tokens=max_tokens,
                              sampler=sampler, processors=processors,
                              history=[mx.array(ids, dtype=mx.int32)])

    text_stream = TextStream(tokenizer, eos, stop, max_tokens)
    generated: List[int] = []
    mx.reset_peak_memory()
    start = time.perf_counter()
    try:
        for count, step in enumerate(steps, start=1):
            token = step.tokens.item()
            if count == 1:
                first = time.perf_counter()
                prompt_tps = len(new_prompt) / max(first - start, 1e-9)
            generated.append(token)
            text, finish = text_stream.add(token)
            elapsed = time.perf_counter() - first
            yield GenerationResponse(
                text=text, token=token, prompt_tokens=len(new_prompt), prompt_tps=prompt_tps,
                generation_tokens=count, generation_tps=(count - 1) / elapsed if count > 1 else 0.0,
                peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish, cached_tokens=cached,
                logprobs=step.logprobs[0])
            if finish:
                break
    finally:
        # Also when the caller stops early (Ctrl-C in a chat): the cache keeps what it holds,
        # which is every token handed out but the last (never fed back), or one more than that
        # (the step queued after it).
        prompt_cache.tokens = (ids + generated)[: prompt_cache.cache[0].offset]


def generate(model, tokenizer, prompt: Prompt, max_tokens: int = 256, verbose: bool = False,
             **kwargs) -> str:
    """The whole generated text (see stream_generate for the options)."""
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose and response is not None:
        print()
        print(format_stats(response))
    return text


def format_stats(response: GenerationResponse) -> str:
    return (f"prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tokens/s | "
            f"generation: {response.generation_tokens} tokens, {response.generation_tps:.1f} "
            f"tokens/s | peak memory: {response.peak_memory:.3f} GB")


def stream_batch_generate(model, tokenizer, prompts: Sequence[Prompt],
                          max_tokens: Sequence[int], *, temperature: float = 0.0,
                          top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                          seed: Optional[int] = None, stops: Optional[Sequence[Sequence[str]]] = None,
                          eos_token_ids: Optional[Sequence[int]] = None,
                          wanted: Optional[Callable[[int], bool]] = None,
                          ) -> Iterator[Tuple[int, GenerationResponse]]:
    """Generate for several prompts in one batch (left-padded, one model call per step for
    all); yield (row, response) as each row's tokens come, rows in order within a step.

    A row ends at an EOS id, one of its stop strings (stops[row]) or max_tokens[row] tokens, and
    when wanted(row) turns false (its reader has gone): the others go on, and the loop stops
    once every row has ended. At temperature 0 each row's text is what stream_generate gives
    for its prompt alone.
    """
    if len(max_tokens) != len(prompts) or (stops is not None and len(stops) != len(prompts)):
        raise ValueError("max_tokens (and stops) need one entry per prompt")
    if min(max_tokens, default=1) < 1:
        raise ValueError(f"max_tokens must be at least 1, got {min(max_tokens)}")
    encoded = [encode_prompt(tokenizer, p, model.config.vocab_size) for p in prompts]
    if not encoded or not all(encoded):
        raise ValueError("the prompt is empty")
    width, context = max(len(ids) for ids in encoded), model.config.max_seq_len
    if width >= context:
        raise ValueError(f"the prompt has {width} tokens; the model's context is {context}")
    if seed is not None:
        check_seed(seed)
    eos = set(eos_token_ids if eos_token_ids is not None
              else [*tokenizer.eos_token_ids, *model.config.eos_token_ids])
    limits = [min(limit, context - width) for limit in max_tokens]
    # Rows join an empty batch: left-padded, each at its own positions, as it would run alone.
    batch = DecodeBatch(model, sampler=make_sampler(temperature, top_p, top_k, min_p),
                        key=None if seed is None else mx.random.key(seed))
    steps = pipelined(batch, batch.join(encoded), max(limits))
    streams = [TextStream(tokenizer, eos, () if stops is None else stops[row], limit)
               for row, limit in enumerate(limits)]
    open_rows = list(range(len(encoded)))
    mx.reset_peak_memory()
    start = time.perf_counter()
    for count, step in enumerate(steps, start=1):
        if count == 1:
            first = time.perf_counter()
            prompt_tps = sum(map(len, encoded)) / max(first - start, 1e-9)
        elapsed = time.perf_counter() - first
        tokens = step.tokens.tolist()
        for row in list(open_rows):
            if wanted is not None and not wanted(row):
                open_rows.remove(row)
                continue
            text, finish = streams[row].add(tokens[row])
            yield row, GenerationResponse(
                text=text, token=tokens[row], prompt_tokens=len(encoded[row]),
                prompt_tps=prompt_tps, generation_tokens=count,
                generation_tps=(count - 1) / elapsed if count > 1 else 0.0,
                peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish,
                logprobs=step.logprobs[row])
            if finish:
                open_rows.remove(row)
        if not open_rows:
            break
    steps.close()  # no step is queued past the last one anyone reads


def batch_generate(model, tokenizer, prompts: Sequence[Prompt], max_tokens: int = 256, *,
                   temperature: float = 0.0, top_p: float = 1.0,
                   seed: Optional[int] = None) -> List[str]:
    """Generate for several prompts at once (left-padded into one batch); each row is what
    generating it alone would give at temperature 0."""
    texts = [""] * len(prompts)
    for row, response in stream_batch_generate(model, tokenizer, prompts,
                                               [max_tokens] * len(prompts),
                                               temperature=temperature, top_p=top_p, seed=seed):
        texts[row] += response.text
    return texts
