"""MobileLLM: token embedding, the decoder stack, and the language-model head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..cache import KVCache, RotatingKVCache
from ..decode import generate_step
from ..quantization import QUANTIZED_LAYERS
from ..sampling import check_seed, make_sampler
from .config import MobileLLMConfig, as_id_list
from .transformer import TransformerDecoder

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    loss: Optional[mx.array]
    """Mean cross-entropy over the counted (label != -100) tokens; None without labels."""
    logits: mx.array
    """(batch, seq, vocab) next-token scores, in the model's dtype."""
    hidden_states: mx.array
    """(batch, seq, embed_dim): the last block's output after the final norm, i.e. exactly
    what the head reads (Hugging Face's hidden_states[-1]). Split over a pipeline
    (pipeline.py), only the positions of logits_to_keep."""


def _as_ids(values) -> mx.array:
    """Token ids from an mx array, a numpy array or nested lists, as a (batch, seq) array."""
    ids = values if isinstance(values, mx.array) else mx.array(values)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(ids.shape)}")
    return ids if ids.dtype == mx.int32 else ids.astype(mx.int32)


def causal_lm_loss(logits: mx.array, labels: mx.array) -> mx.array:
    """Hugging Face's causal LM loss: position t predicts labels[t + 1]; -100 is not counted."""
    targets = labels[:, 1:]
    counted = targets != IGNORE_INDEX
    losses = nn.losses.cross_entropy(
        logits[:, :-1].astype(mx.float32), mx.where(counted, targets, 0), reduction="none"
    )
    return (losses * counted).sum() / mx.maximum(counted.sum(), 1)


class MobileLLM(nn.Module):
    """The MobileLLM causal language model.

    Parameter names (a PyTorch state dict with the same names converts 1:1):
    embed_tokens.weight, decoder.layers.N.{attention_norm,ffn_norm}.weight,
    decoder.layers.N.attention.{q,k,v,o}_proj.weight, decoder.layers.N.ffn.{gate,up,down}_proj.weight,
    decoder.layers.N.attention.{q,k}_norm.weight (weighted QK-norm only), decoder.norm.weight,
    lm_head.weight (untied embeddings only).
    """

    def __init__(self, config: MobileLLMConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim)
        self.decoder = TransformerDecoder(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.embed_dim, config.vocab_size, bias=False)

    def logits(self, hidden_states: mx.array) -> mx.array:
        if self.config.tie_word_embeddings:
            return self.embed_tokens.as_linear(hidden_states)
        return self.lm_head(hidden_states)

    def __call__(self, input_ids, attention_mask=None, labels=None,
                 cache: Optional[list] = None, logits_to_keep: int = 0) -> ModelOutput:
        """forward(input_ids, attention_mask=None, labels=None) as in the seed.

        attention_mask: (batch, seq) with 1 for tokens and 0 for padding (left padding for
        generation); with a cache it covers the cached positions too.
        logits_to_keep: compute logits for the last this many positions only (0: all), as in
        transformers. Generation needs the last one: the head is a prompt chunk's largest
        matmul.
        """
        ids = _as_ids(input_ids)
        mask = None if attention_mask is None else _as_ids(attention_mask)
        offset = cache[0].offset if cache else 0
        if offset + ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {offset + ids.shape[1]} tokens exceeds max_seq_len "
                             f"({self.config.max_seq_len})")
        if logits_to_keep and labels is not None:
            raise ValueError("labels need the logits of every position: pass logits_to_keep=0")
        hidden = self.decoder(self.embed_tokens(ids), mask, cache)
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        if self.decoder.stage is not None:  # the last rank's output, on every rank
            kept = hidden = self.decoder.stage.share_output(kept)
        logits = self.logits(kept)
        loss = None if labels is None else causal_lm_loss(logits, _as_ids(labels))
        return ModelOutput(loss=loss, logits=logits, hidden_states=hidden)

    forward = __call__

    def make_cache(self, max_kv_size: Optional[int] = None) -> list:
        """One KV cache per block call; bounded to max_kv_size positions when given."""
        # The blocks held here: a pipeline stage holds a slice of them (pipeline.py).
        count = len(self.decoder.layers) * self.decoder.calls_per_block
        if max_kv_size is None:
            return [KVCache() for _ in range(count)]
        return [RotatingKVCache(max_kv_size) for _ in range(count)]

    def num_parameters(self) -> int:
        """Total parameter count. Reads shapes only: no weight is materialised. A quantized
        layer counts the weights it packs, not its scales and biases."""
        bits = {path: module.bits for path, module in self.named_modules()
                if isinstance(module, QUANTIZED_LAYERS)}
        total = 0
        for name, p in tree_flatten(self.parameters()):
            module_path, leaf = name.rsplit(".", 1)
            if module_path not in bits:
                total += p.size
            elif leaf == "weight":
                total += p.size * 32 // bits[module_path]
        return total

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.decoder.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.decoder.gradient_checkpointing = False

    def generate(self, input_ids, max_new_tokens: int = 100, temperature: float = 1.0,
                 top_p: float = 0.9, *, attention_mask=None,
                 eos_token_id: Union[None, int, Sequence[int]] = None,
                 pad_token_id: Optional[int] = None, seed: Optional[int] = None) -> mx.array:
        """Sample up to max_new_tokens after each row of input_ids, with a KV cache.

        Returns (batch, prompt_len + new) ids: the prompt followed by the new tokens, as
        transformers' generate does for decoder-only models. Rows of different lengths are
        left-padded, with attention_mask marking the padding. A row that emits an EOS id
        (eos_token_id, else the config's) is finished: later positions hold pad_token_id
        (else the config's, else the first EOS id); generation ends when all rows finish.
        temperature=0 is greedy; seed makes sampling reproducible.
        """
        ids = _as_ids(input_ids)
        prompt_len = ids.shape[1]
        eos_ids = self.config.eos_token_ids if eos_token_id is None else as_id_list(eos_token_id)
        if pad_token_id is None:
            pad_token_id = self.config.pad_token_id
        if pad_token_id is None:
            pad_token_id = eos_ids[0] if eos_ids else 0
        if prompt_len >= self.config.max_seq_len:
            raise ValueError(f"the prompt has {prompt_len} tokens; max_seq_len is "
                             f"{self.config.max_seq_len}, so there is no room to generate")
        steps = generate_step(
            self, ids, self.make_cache(),
            max_tokens=min(max_new_tokens, self.config.max_seq_len - prompt_len),
            sampler=make_sampler(temperature, top_p),
            attention_mask=None if attention_mask is None else _as_ids(attention_mask),
            key=None if seed is None else mx.random.key(check_seed(seed)))
        new = _padded_after_eos(steps, ids.shape[0], set(eos_ids), pad_token_id)
        if not new:
            return ids
        return mx.concatenate([ids, mx.array(new, dtype=mx.int32).T], axis=1)


def _padded_after_eos(steps, rows: int, eos_ids: set, pad_token_id: int) -> list:
    """Each step's tokens (a list per step), with pad_token_id in every row after its first
    EOS; stops reading once every row has finished. The bookkeeping is on the host: an array
    operation here would queue behind the step computing ahead and wait for it."""
    new, finished = [], [False] * rows
    for step in steps:
        tokens = step.tokens.tolist()
        tokens = [pad_token_id if done else token for token, done in zip(tokens, finished)]
        new.append(tokens)
        finished = [done or token in eos_ids for token, done in zip(tokens, finished)]
        if all(finished):
            break
    return new
