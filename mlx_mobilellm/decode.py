"""The decode loop: a batch of rows stepping together, one model call per step for all of them.

Every generation path steps a DecodeBatch: generate_step (MobileLLM.generate, stream_generate,
batch_generate) over a fixed set of rows, and the server's continuous batching, whose rows join
and leave between steps. Speculative decoding runs on the same parts (prefill, the model call,
choose).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .cache import RotatingKVCache
from .sampling import LogitsProcessor, Sampler, make_sampler

PREFILL_STEP = 512


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


def choose(logits: mx.array, sampler: Sampler, key: Optional[mx.array] = None,
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


class DecodeBatch:
    """Rows decoding together. Each row's latest token (`tokens`) is fed at the next step;
    `mask` (rows, cached positions) marks each row's padding, None when there is none.

    Rows may join between steps (the server's continuous batching): joining prompts are
    prefilled together, then their cache is stacked under the others', the shorter side padded
    on the left so that every row ends at the same slot. RoPE takes each row's own position (the
    cache's left_padding), so a joined row computes what it would alone. Rows leave between
    steps too (keep).
    """

    def __init__(self, model, *, sampler: Optional[Sampler] = None,
                 processors: Sequence[LogitsProcessor] = (), key: Optional[mx.array] = None):
        self.model = model
        self.sampler = sampler or make_sampler()
        self.processors = list(processors)
        self.key = key
        self.cache: Optional[list] = None
        self.mask: Optional[mx.array] = None
        self.first_slots: List[int] = []
        """Each row's first slot that is not padding, known on the host: reading it off the
        mask would wait for the step being computed."""
        self.tokens: Optional[mx.array] = None
        self.histories: list = []
        """Each row's 1-D ids as the processors see them (kept only when there are any)."""

    @property
    def rows(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[0]

    def _choose(self, logits: mx.array, histories: list) -> Step:
        key = None
        if self.key is not None:
            self.key, key = mx.random.split(self.key)
        step = choose(logits, self.sampler, key, self.processors, histories)
        if self.processors:
            self.histories = [mx.concatenate([h, t]) for h, t in zip(histories, step.tokens[:, None])]
        return step

    def start(self, prompt: mx.array, cache: list, attention_mask=None,
              histories: Optional[Sequence[mx.array]] = None) -> Step:
        """The first rows: `prompt` (rows, seq), ids not yet in `cache` (which may hold their
        common prefix already). attention_mask: (rows, cached + seq), 1 for tokens, 0 for
        left padding. histories: what the processors see of each row, default its prompt."""
        self.cache = cache
        if attention_mask is None:
            self.mask, self.first_slots = None, [0] * prompt.shape[0]
        else:
            padding = np.asarray(attention_mask)
            self.mask = mx.array(padding).astype(mx.int32)
            self.first_slots = np.argmax(padding != 0, axis=1).tolist()
        histories = list(prompt if histories is None else histories) if self.processors else []
        step = self._choose(prefill(self.model, prompt, cache, self.mask), histories)
        self.tokens = step.tokens
        return step

    def step(self) -> Step:
        """Feed every row's latest token: the next token of each."""
        if self.mask is not None:
            self.mask = mx.concatenate([self.mask, mx.ones((self.rows, 1), mx.int32)], axis=1)
        logits = _logits(self.model, self.tokens[:, None], self.cache, self.mask)[:, -1]
        step = self._choose(logits, self.histories)
        self.tokens = step.tokens
        return step

    def join(self, prompts: Sequence[Sequence[int]]) -> Step:
        """Add a row for each prompt (its ids): their first tokens, a Step of len(prompts)
        rows, prefilled in one batch of their own."""
        if self.cache is not None and any(isinstance(c, RotatingKVCache) for c in self.cache):
            raise ValueError("rows cannot join a batch whose KV cache is bounded (rotating)")
        width = max(len(prompt) for prompt in prompts)
        pads = [width - len(prompt) for prompt in prompts]
        ids = mx.array([[0] * pad + list(prompt) for pad, prompt in zip(pads, prompts)],
                       dtype=mx.int32)
        mask = mx.array([[0] * pad + [1] * (width - pad) for pad in pads], dtype=mx.int32)
        cache = self.model.make_cache()
        for layer in cache:  # every joining row's positions start at 0, as alone
            layer.left_padding = mx.array(pads, dtype=mx.int32)
        others = self.histories
        first = self._choose(prefill(self.model, ids, cache, mask if any(pads) else None),
                             [mx.array(list(p), dtype=mx.int32) for p in prompts]
                             if self.processors else [])
        self.histories = others + self.histories
        if self.rows == 0:
            self.cache, self.tokens, self.first_slots = cache, first.tokens, pads
            self.mask = mask if any(pads) else None
            return first
        cached = self.cache[0].offset
        old_mask = self.mask if self.mask is not None else mx.ones((self.rows, cached), mx.int32)
        if width < cached:
            _pad_left(cache, cached - width)
            mask = mx.concatenate([mx.zeros((len(pads), cached - width), mx.int32), mask], axis=1)
            pads = [pad + cached - width for pad in pads]
        elif width > cached:
            _pad_left(self.cache, width - cached)
            old_mask = mx.concatenate([mx.zeros((self.rows, width - cached), mx.int32), old_mask],
                                      axis=1)
            self.first_slots = [slot + width - cached for slot in self.first_slots]
        for layer, joining in zip(self.cache, cache):
            layer.stack(joining)
        self.mask = mx.concatenate([old_mask, mask])
        self.first_slots += pads
        self.tokens = mx.concatenate([self.tokens, first.tokens])
        return first

    def keep(self, rows: Sequence[int]) -> None:
        """Keep these rows (in this order), drop the others. Positions that are padding in
        every row kept are dropped from the cache too, so a long-lived batch stays compact."""
        if not rows:
            self.cache = self.mask = self.tokens = None
            self.first_slots, self.histories = [], []
            return
        index = mx.array(list(rows), dtype=mx.int32)
        for layer in self.cache:
            layer.take_rows(index)
        self.tokens = self.tokens[index]
        self.histories = [self.histories[row] for row in rows] if self.processors else []
        self.first_slots = [self.first_slots[row] for row in rows]
        if self.mask is None:
            return
        self.mask = self.mask[index]
        unused = min(self.first_slots)
        if unused:
            for layer in self.cache:
                layer.drop_leading(unused)
            self.mask = self.mask[:, unused:]
            self.first_slots = [slot - unused for slot in self.first_slots]


def _pad_left(cache: list, count: int) -> None:
    for layer in cache:
        layer.pad_left(count)


def generate_step(model, prompt: mx.array, cache: list, *, max_tokens: int,
                  sampler: Optional[Sampler] = None, processors: Sequence[LogitsProcessor] = (),
                  history: Optional[Sequence[mx.array]] = None,
                  attention_mask: Optional[mx.array] = None,
                  key: Optional[mx.array] = None) -> Iterator[Step]:
    """The decode loop over a fixed set of rows: yield a Step for each of up to max_tokens
    tokens after `prompt`.

    prompt: (batch, seq) or 1-D ids not yet in `cache`. attention_mask: (batch, cached + seq),
    1 for tokens and 0 for left padding. sampler: greedy by default. key: a random key, split
    anew at every step (reproducible sampling); None draws from MLX's global generator.
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
    batch = DecodeBatch(model, sampler=sampler, processors=processors, key=key)
    step = batch.start(prompt if prompt.ndim == 2 else prompt[None], cache, attention_mask,
                       history)
    yield from pipelined(batch, step, max_tokens)


def pipelined(batch: DecodeBatch, first: Step, max_tokens: int) -> Iterator[Step]:
    """`first` and the batch's next steps, max_tokens in all, each queued before the one
    before it is handed out."""
    step = first
    mx.async_eval(step.tokens)
    for _ in range(1, max_tokens):
        following = batch.step()
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
    first = choose(prefill(model, prompt[None], cache), sampler)
    prefill(draft_model, prompt[None], draft_cache)  # its logits are not needed
    yield first
    last = unseen_by_draft = first.tokens
    remaining = max_tokens - 1
    while remaining > 0:
        count = min(num_draft, remaining - 1)
        drafted, draft_input = [], unseen_by_draft
        for _ in range(count):
            draft_input = choose(_logits(draft_model, draft_input[None], draft_cache)[:, -1],
                                  sampler).tokens
            drafted.append(draft_input)
        verified = choose(_logits(model, mx.concatenate([last, *drafted])[None], cache,
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


