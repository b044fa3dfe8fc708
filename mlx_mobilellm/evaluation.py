"""Perplexity: the mean negative log-likelihood of every token of some texts, and its exp.

A text longer than max_seq_length is scored in windows of max_seq_length tokens that advance
by half a window (the stride): each window scores only the tokens no earlier window scored, so
every token is scored exactly once, and each one past the first window sees at least half a
window of context. The last window ends at the text's end and is full length, so its tokens
get as much context as the model can take (as lm-evaluation-harness's rolling loglikelihood
does). A text's first token has no context and is not scored: texts encoded with a BOS token
score all their own tokens.
"""

from __future__ import annotations

import math
import time
from typing import Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .errors import ParameterError
from .input_checks import check_text

DEFAULT_WINDOW = 1024
"""Tokens per window unless told otherwise (or the model's context, if shorter): the logits of
a batch of 4 such windows over a 128k vocabulary take 2 GB in float32."""


def windows(length: int, max_seq_length: int) -> Iterator[Tuple[int, int, int]]:
    """(begin, end, first): run tokens[begin:end] and score positions first..end-1 of a
    sequence of `length` tokens. Every position but 0 is scored once."""
    stride = max(max_seq_length // 2, 1)
    end = min(max_seq_length, length)
    yield 0, end, 1
    while end < length:
        new_end = min(end + stride, length)
        yield max(0, new_end - max_seq_length), new_end, end
        end = new_end


def _window_nlls(model, rows: List[Tuple[List[int], int]]) -> List[float]:
    """The summed negative log-likelihood of each row's scored tokens: (tokens, first) scores
    tokens[first:] given what precedes them. Rows are right-padded into one batch: causal
    attention keeps a real position from seeing the padding after it, so no mask is needed."""
    width = max(len(tokens) for tokens, _ in rows)
    ids = mx.array([tokens + [0] * (width - len(tokens)) for tokens, _ in rows], dtype=mx.int32)
    logits = model(ids[:, :-1]).logits.astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = np.array(mx.take_along_axis(logprobs, ids[:, 1:, None], axis=-1)[..., 0])
    # Summed on the host in float64: a long text's total must not lose the small terms.
    return [-float(picked[row, first - 1 : len(tokens) - 1].astype(np.float64).sum())
            for row, (tokens, first) in enumerate(rows)]


def check_parameters(max_seq_length: Optional[int], batch_size: int,
                     context: Optional[int] = None) -> None:
    """The bounds of the window parameters (against the model's context, once it is known)."""
    if max_seq_length is not None and max_seq_length < 2:
        raise ParameterError(lambda name: f"{name('max_seq_length')} must be at least 2, got "
                                          f"{max_seq_length}")
    if batch_size < 1:
        raise ParameterError(lambda name: f"{name('batch_size')} must be at least 1, got "
                                          f"{batch_size}")
    if context is not None and max_seq_length is not None and max_seq_length > context:
        raise ParameterError(lambda name: f"{name('max_seq_length')} {max_seq_length} exceeds "
                                          f"the model's context ({context}); give at most "
                                          f"{context}")


def sequence_nlls(model, sequences: Sequence[Sequence[int]],
                  max_seq_length: Optional[int] = None,
                  batch_size: int = 4) -> List[Tuple[float, int]]:
    """(summed negative log-likelihood, tokens scored) of each token sequence, in windows of
    max_seq_length (see the module's docstring; default DEFAULT_WINDOW, or the model's
    context if shorter), batch_size windows per model call."""
    context = model.config.max_seq_len
    check_parameters(max_seq_length, batch_size, context)
    max_seq_length = max_seq_length or min(DEFAULT_WINDOW, context)
    vocab = model.config.vocab_size
    work = []  # (sequence index, tokens of the window, first scored position in it)
    for index, sequence in enumerate(sequences):
        tokens = [int(t) for t in sequence]
        wrong = next((t for t in tokens if not 0 <= t < vocab), None)
        if wrong is not None:  # the embedding does not check its indices
            raise ValueError(f"sequence {index} holds token id {wrong}, outside the model's "
                             f"vocabulary [0, {vocab})")
        if len(tokens) >= 2:
            work.extend((index, tokens[begin:end], first - begin)
                        for begin, end, first in windows(len(tokens), max_seq_length))
    # Windows of similar lengths batch together: little padding.
    work.sort(key=lambda item: len(item[1]), reverse=True)
    totals = [[0.0, 0] for _ in sequences]
    for start in range(0, len(work), batch_size):
        batch = work[start : start + batch_size]
        nlls = _window_nlls(model, [(tokens, first) for _, tokens, first in batch])
        for (index, tokens, first), nll in zip(batch, nlls):
            totals[index][0] += nll
            totals[index][1] += len(tokens) - first
    return [(nll, count) for nll, count in totals]


def summary(nlls: Sequence[Tuple[float, int]], seconds: float) -> dict:
    """tokens, mean_nll, perplexity, seconds of per-sequence (nll, count) pairs."""
    total = sum(nll for nll, _ in nlls)
    tokens = sum(count for _, count in nlls)
    if tokens == 0:
        raise ValueError("nothing to score: every text is shorter than two tokens")
    mean = total / tokens
    return {"tokens": tokens, "mean_nll": mean, "perplexity": math.exp(mean),
            "seconds": seconds}


def perplexity(model, tokenizer, texts: Sequence[str], max_seq_length: Optional[int] = None,
               batch_size: int = 4) -> dict:
    """{"tokens", "mean_nll", "perplexity", "seconds"} over all tokens of `texts`, each
    encoded on its own (with the tokenizer's BOS, if it adds one) and scored in windows of
    max_seq_length tokens, batch_size windows per model call."""
    start = time.perf_counter()
    sequences = [tokenizer.encode(check_text(text, f"text {i}")) for i, text in enumerate(texts)]
    nlls = sequence_nlls(model, sequences, max_seq_length, batch_size)
    return summary(nlls, time.perf_counter() - start)
