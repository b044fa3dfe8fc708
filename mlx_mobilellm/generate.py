"""Text generation: the decode loop, streaming with stop strings, prompt-cache reuse,
speculative decoding with a draft model, and batches of prompts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Union

import mlx.core as mx

from .cache import RotatingKVCache
from .detokenizer import StreamingDetokenizer
from .sampling import LogitsProcessor, Sampler, check_seed, make_logits_processors, make_sampler
from .input_checks import check_text

PREFILL_STEP = 512
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


@dataclass
class PromptCache:
    """A KV cache kept across calls (chat turns) with the token ids it holds, so the next
    prompt processes only what is new after their common prefix."""
    cache: list
    tokens: List[int] = field(default_factory=list)

    @classmethod
    def for_model(cls, model, max_kv_size: Optional[int] = None) -> "PromptCache":
        return cls(model.make_cache(max_kv_size))

    def reuse(self, prompt: List[int]) -> int:
        """Trim the cache to its common prefix with `prompt` and return that length; at least
        one prompt token is always left to process (it yields the first logits)."""
        common = 0
        for cached, new in zip(self.tokens, prompt):
            if cached != new:
                break
            common += 1
        common = min(common, len(prompt) - 1)
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


def _forward(model, tokens: mx.array, cache: list) -> mx.array:
    """Logits of the last position, (1, vocab)."""
    hidden = model.decoder(model.embed_tokens(tokens[None]), None, cache)
    return model.logits(hidden[:, -1])


def _prefill(model, tokens: mx.array, cache: list) -> None:
    """Run `tokens` into the cache in chunks, evaluating each chunk so that a long prompt
    never holds more than one chunk's activations."""
    for start in range(0, tokens.size, PREFILL_STEP):
        model.decoder(model.embed_tokens(tokens[None, start:start + PREFILL_STEP]), None, cache)
        mx.eval([c.state for c in cache])


def _next_token(logits: mx.array, history: mx.array, sampler: Sampler,
                processors: Sequence[LogitsProcessor]) -> mx.array:
    for process in processors:
        logits = process(history, logits)
    return sampler(logits, None)


def generate_step(model, prompt: mx.array, cache: list, sampler: Sampler,
                  processors: Sequence[LogitsProcessor] = (),
                  history: Optional[mx.array] = None) -> Iterator[int]:
    """Yield token ids after `prompt` (1-D ids not yet in `cache`), forever.

    history: the whole context the processors see (cached tokens + prompt); default `prompt`.

    The next step is queued (mx.async_eval) before the current token is handed out, so the
    device computes token n+1 while the host streams token n.
    """
    _prefill(model, prompt[:-1], cache)
    history = prompt if history is None else history

    def step(tokens: mx.array) -> mx.array:
        nonlocal history
        token = _next_token(_forward(model, tokens, cache), history, sampler, processors)
        if processors:
            history = mx.concatenate([history, token])
        return token

    token = step(prompt[-1:])
    mx.async_eval(token)
    while True:
        following = step(token)
        mx.async_eval(following)
        yield token.item()
        token = following


def speculative_generate_step(model, draft_model, prompt: mx.array, cache: list,
                              draft_cache: list, sampler: Sampler, num_draft: int = 3,
                              stats: Optional[dict] = None) -> Iterator[int]:
    """Yield the same tokens as generate_step, fewer model calls: the draft model proposes
    num_draft tokens, the model scores them all in one call and keeps the longest prefix that
    agrees with its own choice at each position, plus its own next token.

    A token is kept only when it equals the model's own sample, so the output follows the
    model's distribution exactly (and equals plain greedy at temperature 0).
    stats, when given, counts "drafted" and "accepted" tokens.
    """
    _prefill(model, prompt[:-1], cache)
    _prefill(draft_model, prompt[:-1], draft_cache)
    last = prompt[-1:]
    while True:
        drafted = []
        draft_input = last
        for _ in range(num_draft):
            draft_input = sampler(_forward(draft_model, draft_input, draft_cache), None)
            drafted.append(draft_input)
        drafted = mx.concatenate(drafted)
        hidden = model.decoder(model.embed_tokens(mx.concatenate([last, drafted])[None]), None, cache)
        chosen = sampler(model.logits(hidden[0]), None)
        chosen_list, drafted_list = chosen.tolist(), drafted.tolist()
        accepted = 0
        while accepted < num_draft and drafted_list[accepted] == chosen_list[accepted]:
            accepted += 1
        if stats is not None:
            stats["drafted"] = stats.get("drafted", 0) + num_draft
            stats["accepted"] = stats.get("accepted", 0) + accepted
        # The model cached last + all drafts; keep last + the accepted ones. The draft cached
        # last + drafts but the final one; keep last + the accepted ones too.
        for layer in cache:
            layer.trim(num_draft - accepted)
        for layer in draft_cache:
            layer.trim(max(num_draft - 1 - accepted, 0))
        for token in chosen_list[: accepted + 1]:
            yield token
        if accepted == num_draft:  # the draft has not seen its own final token yet
            _forward(draft_model, drafted[-1:], draft_cache)
        last = chosen[accepted : accepted + 1]


class _StopStrings:
    """Holds back text that might be the start of a stop string, so none is ever emitted."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str):
        """(text safe to emit, whether a stop string was reached)."""
        self.pending += text
        # The earliest match: one delta may hold several stop strings.
        found = [at for at in (self.pending.find(stop) for stop in self.stops) if at >= 0]
        if found:
            out, self.pending = self.pending[: min(found)], ""
            return out, True
        hold = max((n for stop in self.stops for n in range(1, len(stop))
                    if self.pending.endswith(stop[:n])), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


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

    if draft_model is not None:
        if processors:
            raise ValueError("speculative decoding does not take logits processors "
                             "(repetition penalty)")
        draft_cache = draft_model.make_cache()
        _prefill(draft_model, mx.array(ids[:cached], dtype=mx.int32), draft_cache)
        tokens = speculative_generate_step(model, draft_model, new_prompt, prompt_cache.cache,
                                           draft_cache, sampler, num_draft_tokens, draft_stats)
    else:
        tokens = generate_step(model, new_prompt, prompt_cache.cache, sampler, processors,
                               mx.array(ids, dtype=mx.int32))

    detokenizer = StreamingDetokenizer(tokenizer)
    stops = _StopStrings(stop)
    max_tokens = min(max_tokens, context - len(ids))
    generated: List[int] = []
    mx.reset_peak_memory()
    start = time.perf_counter()
    prompt_tps = 0.0
    try:
        for count, token in enumerate(tokens, start=1):
            if count == 1:
                first = time.perf_counter()
                prompt_tps = len(new_prompt) / max(first - start, 1e-9)
            generated.append(token)
            finish = "stop" if token in eos else ("length" if count >= max_tokens else None)
            text = detokenizer.add_token(token) if token not in eos else ""
            if finish:
                text += detokenizer.finalize()
            text, stopped = stops.feed(text)
            if stopped:
                finish = "stop"
            elif finish:
                text += stops.flush()
            elapsed = time.perf_counter() - first
            yield GenerationResponse(
                text=text, token=token, prompt_tokens=len(new_prompt), prompt_tps=prompt_tps,
                generation_tokens=count, generation_tps=(count - 1) / elapsed if count > 1 else 0.0,
                peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish, cached_tokens=cached)
            if finish:
                break
    finally:
        # Also when the caller stops early (Ctrl-C in a chat): the cache keeps what it holds.
        # It may hold one token more than was handed out (the queued next step).
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


def batch_generate(model, tokenizer, prompts: Sequence[Prompt], max_tokens: int = 256, *,
                   temperature: float = 0.0, top_p: float = 1.0,
                   seed: Optional[int] = None) -> List[str]:
    """Generate for several prompts at once (left-padded into one batch); each row is what
    generating it alone would give at temperature 0."""
    if seed is not None:
        check_seed(seed)
    encoded = [encode_prompt(tokenizer, p, model.config.vocab_size) for p in prompts]
    width = max(len(ids) for ids in encoded)
    eos = [*tokenizer.eos_token_ids, *model.config.eos_token_ids]
    pad = eos[0] if eos else 0
    ids = [[pad] * (width - len(row)) + row for row in encoded]
    mask = [[0] * (width - len(row)) + [1] * len(row) for row in encoded]
    out = model.generate(ids, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                         attention_mask=mask, eos_token_id=eos or [], pad_token_id=pad,
                         seed=seed).tolist()
    texts = []
    for row in out:
        new = row[width:]
        stop_at = next((i for i, t in enumerate(new) if t in eos), len(new))
        texts.append(tokenizer.decode(new[:stop_at]))
    return texts
