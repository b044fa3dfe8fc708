"""Packed pretraining batches: windows of seq_length tokens cut from one token stream.

The documents lie back to back in the stream, each ended by its EOS, and a window may span
several of them: attention is not masked at document boundaries (as in nanoGPT and most
pretraining runs; the EOS tells the model where a document ends). The labels are the inputs
themselves: the model's loss predicts position t + 1 from position t.

The last val_fraction of the stream (at least one window's worth) is held out for validation
and never trained on. Each training row starts at a random position of the rest, drawn from a
generator seeded by (seed, micro-batch number), so that micro-batch n is the same whenever it
is drawn: a resumed run trains on exactly the batches an uninterrupted one would. Validation
reads the held-out tokens as consecutive windows that do not overlap (a last partial one is
left out).
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator, Optional

import mlx.core as mx
import numpy as np

from ..errors import ParameterError
from .trainer import TrainingArgs, TrainingData


def validation_size(count: int, seq_length: int, val_fraction: float) -> int:
    """How many tokens at the stream's end are held out (0 without validation); refuses a
    stream too short to train on one window and validate on another."""
    held_out = max(math.ceil(count * val_fraction), seq_length) if val_fraction > 0 else 0
    if count - held_out < seq_length:
        need = (f"{seq_length:,} to train on and {held_out:,} to validate on" if held_out
                else f"{seq_length:,}")
        raise ParameterError(lambda name: f"the text has {count:,} tokens, too few for "
                             f"{name('seq_length')} {seq_length}: it needs {need}; add text or "
                             f"lower {name('seq_length')}"
                             + (f" or {name('val_fraction')}" if held_out else ""))
    return held_out


def check_sizes(count: int, seq_length: int, val_fraction: float, batch_size: int) -> None:
    """Refuse a stream too short for one window of each split, or for one batch: rows are
    drawn with replacement, and a batch holding more tokens than the text has is a sign of a
    typo (and, large enough, of memory that cannot be had)."""
    train_count = count - validation_size(count, seq_length, val_fraction)
    if batch_size * seq_length > train_count:
        raise ParameterError(lambda name: f"{name('batch_size')} {batch_size} windows of "
                             f"{seq_length} tokens are more than the {train_count:,} training "
                             f"tokens of the text; lower {name('batch_size')} or "
                             f"{name('seq_length')}, or add text")


def training_starts(train_count: int, seq_length: int, batch_size: int, seed: int,
                    micro_batch: int) -> np.ndarray:
    """The first positions of a training micro-batch's rows, each window inside the first
    train_count tokens."""
    generator = np.random.default_rng([seed, micro_batch])
    return generator.integers(0, train_count - seq_length + 1, size=batch_size)


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_length: int) -> mx.array:
    rows = tokens[starts[:, None] + np.arange(seq_length)]
    return mx.array(rows.astype(np.int32))


def training_batches(tokens: np.ndarray, train_count: int, seq_length: int, batch_size: int,
                     seed: int, start: int = 0) -> Iterator:
    """(inputs, labels) micro-batches from micro-batch number `start` on, forever."""
    for micro_batch in itertools.count(start):
        starts = training_starts(train_count, seq_length, batch_size, seed, micro_batch)
        rows = _windows(tokens, starts, seq_length)
        yield rows, rows


def validation_loss(model, tokens: np.ndarray, first: int, seq_length: int, batch_size: int,
                    max_batches: Optional[int] = None) -> float:
    """Mean loss per predicted token over the windows of tokens[first:] (up to max_batches
    batches of them)."""
    starts = np.arange(first, len(tokens) - seq_length + 1, seq_length)
    batches = [starts[i:i + batch_size] for i in range(0, len(starts), batch_size)]
    total, counted = 0.0, 0
    for batch in batches[:max_batches]:
        rows = _windows(tokens, batch, seq_length)
        predicted = rows.shape[0] * (seq_length - 1)
        total += model(rows, labels=rows).loss.item() * predicted
        counted += predicted
    return total / counted


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows past about 709


def packed_data(tokens: np.ndarray, seq_length: int, val_fraction: float,
                args: TrainingArgs) -> TrainingData:
    """The trainer's data from a token stream: packed training windows, and the validation
    loss and perplexity on the held-out end (no validation with val_fraction 0)."""
    train_count = len(tokens) - validation_size(len(tokens), seq_length, val_fraction)

    def micro_batches(start):
        return training_batches(tokens, train_count, seq_length, args.batch_size, args.seed,
                                start)

    def validate(model):
        loss = validation_loss(model, tokens, train_count, seq_length, args.batch_size,
                               args.val_batches)
        return {"val_loss": loss, "val_perplexity": perplexity(loss)}

    return TrainingData(micro_batches, validate if train_count < len(tokens) else None)
