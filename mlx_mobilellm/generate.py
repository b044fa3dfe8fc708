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


@dataclass
class Step:
    """One decoding step of every row of a batch."""
    tokens: mx.array
    """(rows,) int32: each row's next token."""
    logprobs: mx.array
    """(rows, vocab) float32: the log-softmax of the scores each token was drawn from (after
    the logits processors, before temperature and filters). Lazy: computed only when read, so
    decoding pays nothing for them otherwise."""


def _logits(model, ids: mx.array, cache: list, attention_mask: Optional[mx.array] = None,
            positions: int = 1) -> mx.array:
    """(batch, positions, vocab): the model's next-token scores at the last `positions` of
    `ids` (batch, seq), which it appends to `cache`. Every path calls the model here."""
    return model(ids, attention_mask=attention_mask, cache=cache, logits_to_keep=positions).logits


def prefill(model, prompt: mx.array, cache: list,
            attention_mask: Optional[mx.array] = None) -> mx.array:
    """Run `prompt` (batch, seq) into `cache`; return the last position's logits (batch, vocab).

    The prompt goes in chunks of PREFILL_STEP; each chunk but the last is evaluated at once,
    its cache only, so a long prompt never holds more than one chunk's activations and the
    head never runs on it. attention_mask covers the cached positions too.
    """
    if prompt.shape[1] == 0:
        raise ValueError("the prompt is empty")
    cached = cache[0].offset
    starts = range(0, prompt.shape[1], PREFILL_STEP)
    for start in starts[:-1]:
        end = cached + start + PREFILL_STEP
        _logits(model, prompt[:, start : start + PREFILL_STEP], cache,
                None if attention_mask is None else attention_mask[:, :end])
        mx.eval([(c.keys, c.values) for c in cache])
    return _logits(model, prompt[:, starts[-1]:], cache, attention_mask)[:, -1]


def _choose(logits: mx.array, sampler: Sampler, key: Optional[mx.array] = None,
            processors: Sequence[LogitsProcessor] = (), histories: Sequence[mx.array] = ()) -> Step:
    """Each row's token from its (rows, vocab) logits, after the processors (which see that
    row's 1-D history)."""
    if processors:
        rows = []
        for row, history in enumerate(histories):
            row_logits = logits[row : row + 1]
            for process in processors:
                row_logits = process(history, row_logits)
            rows.append(row_logits)
        logits = mx.concatenate(rows)
    scores = logits.astype(mx.float32)
    logprobs = scores - mx.logsumexp(scores, axis=-1, keepdims=True)
    return Step(sampler(logits, key).astype(mx.int32), logprobs)


def generate_step(model, prompt: mx.array, cache: list, *, max_tokens: int,
                  sampler: Optional[Sampler] = None, processors: Sequence[LogitsProcessor] = (),
                  history: Optional[Sequence[mx.array]] = None,
                  attention_mask: Optional[mx.array] = None,
                  key: Optional[mx.array] = None) -> Iterator[Step]:
    """The decode loop: yield a Step for each of up to max_tokens tokens after `prompt`.

    prompt: (batch, seq) or 1-D ids not yet in `cache`. attention_mask: (batch, cached + seq),
    1 for tokens and 0 for left padding. sampler: greedy by default. key: a random key, split
    into one per step (reproducible sampling); None draws from MLX's global generator.
    processors: logits processors, applied to each row with its history (1-D: default the
    row's prompt; the row's generated tokens are appended as they come).

    Each step is queued (mx.async_eval) before the one before it is handed out, so the device
    computes token n+1 while the caller reads token n; the last step queues nothing, so
    max_tokens=N costs the prefill and N-1 one-token model calls, none wasted. Rows only
    share the model calls: a caller can drop a row that finished (EOS, its own max_tokens)
    without the others noticing.
    """
    if max_tokens < 1:
        return
    prompt = prompt if prompt.ndim == 2 else prompt[None]
    batch = prompt.shape[0]
    sampler = sampler or make_sampler()
    keys = None if key is None else mx.random.split(key, max_tokens)
    histories = list(prompt if history is None else history) if processors else []
    mask = None if attention_mask is None else mx.array(attention_mask).astype(mx.int32)

    def choose(logits: mx.array, n: int) -> Step:
        nonlocal histories
        step = _choose(logits, sampler, None if keys is None else keys[n], processors, histories)
        if processors:
            histories = [mx.concatenate([h, t]) for h, t in zip(histories, step.tokens[:, None])]
        return step

    step = choose(prefill(model, prompt, cache, mask), 0)
    mx.async_eval(step.tokens)
    for n in range(1, max_tokens):
        if mask is not None:
            mask = mx.concatenate([mask, mx.ones((batch, 1), mx.int32)], axis=1)
        following = choose(_logits(model, step.tokens[:, None], cache, mask)[:, -1], n)
        mx.async_eval(following.tokens)
        yield step
        step = following
    yield step


def speculative_generate_step(model, draft_model, prompt: mx.array, cache: list,
                              draft_cache: list, *, max_tokens: int, sampler: Sampler,
                              num_draft: int = 3, stats: Optional[dict] = None) -> Iterator[Step]:
    """Yield the same tokens as generate_step, in fewer model calls: the draft model proposes
    up to num_draft tokens, the model scores them all in one call and keeps the longest prefix
    that agrees with its own choice at each position, plus its own next token.

    Both models run on generate_step's parts: `prefill` for the prompt (1-D ids in neither
    cache), `_logits` + `_choose` for each draft token, and one `_logits` call over the last
    token and the drafts whose positions `_choose` samples as rows. A token is kept only when
    it equals the model's own sample, so the output follows the model's distribution exactly
    (and equals plain greedy at temperature 0). A round never drafts past max_tokens.
    stats, when given, counts "drafted" and "accepted" tokens.
    """
    if max_tokens < 1:
        return
    first = _choose(prefill(model, prompt[None], cache), sampler)
    prefill(draft_model, prompt[None], draft_cache)  # its logits are not needed
    yield first
    last = unseen_by_draft = first.tokens
    remaining = max_tokens - 1
    while remaining > 0:
        count = min(num_draft, remaining - 1)
        drafted, draft_input = [], unseen_by_draft
        for _ in range(count):
            draft_input = _choose(_logits(draft_model, draft_input[None], draft_cache)[:, -1],
                                  sampler).tokens
            drafted.append(draft_input)
        verified = _choose(_logits(model, mx.concatenate([last, *drafted])[None], cache,
                                   positions=count + 1)[0], sampler)
        chosen = verified.tokens.tolist()
        proposed = mx.concatenate(drafted).tolist() if drafted else []
        accepted = 0
        while accepted < count and proposed[accepted] == chosen[accepted]:
            accepted += 1
        if stats is not None:
            stats["drafted"] = stats.get("drafted", 0) + count
            stats["accepted"] = stats.get("accepted", 0) + accepted
        # The model cached last + all drafts: keep last + the accepted ones. The draft cached
        # what it had not seen + the drafts but the final one (never fed back): keep the
        # accepted ones too, and feed the final one next round if it was accepted.
        for layer in cache:
            layer.trim(count - accepted)
        last = verified.tokens[accepted : accepted + 1]
        if count:
            for layer in draft_cache:
                layer.trim(count - 1 - accepted if accepted < count else 0)
            unseen_by_draft = mx.concatenate([drafted[-1], last]) if accepted == count else last
        else:
            unseen_by_draft = mx.concatenate([unseen_by_draft, last])
        for i in range(accepted + 1):
            yield Step(verified.tokens[i : i + 1], verified.logprobs[i : i + 1])
        remaining -= accepted + 1


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

    detokenizer = StreamingDetokenizer(tokenizer)
    stops = _StopStrings(stop)
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
