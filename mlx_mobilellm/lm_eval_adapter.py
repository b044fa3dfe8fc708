"""lm-evaluation-harness on our models: an `LM` registered as "mlx-mobilellm".

    import lm_eval, mlx_mobilellm.lm_eval_adapter
    lm_eval.simple_evaluate(model="mlx-mobilellm", model_args="pretrained=PATH", tasks=[...])

or, from the shell, `python -m mlx_mobilellm.lm_eval_adapter --model mlx-mobilellm
--model_args pretrained=PATH --tasks hellaswag` (lm_eval's own command line, with the model
registered). Loglikelihoods come from one forward pass per batch of requests; rolling
loglikelihoods are evaluation.py's perplexity windows; generation is our decode loop
(stream_batch_generate), stopping at the `until` strings.

Needs `pip install lm-eval`; the rest of mlx_mobilellm never imports this module.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .evaluation import sequence_nlls
from .generate import stream_batch_generate
from .loading import load

DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_MAX_LENGTH = 2048
"""Tokens of one forward pass unless max_length says otherwise (as lm_eval's Hugging Face model
does): a model's full context (32k for MobileLLM-R1) would take GBs of logits per window."""


@register_model("mlx-mobilellm")
class MobileLLMEval(LM):
    """pretrained: anything mlx_mobilellm.load reads (default: the demo model); or pass a
    loaded `model` and `tokenizer`. max_length bounds the tokens of one forward pass (default:
    DEFAULT_MAX_LENGTH, or the model's context if shorter); batch_size is requests (or
    windows) per model call."""

    def __init__(self, pretrained: Optional[str] = None, dtype: Optional[str] = None,
                 adapter_path: Optional[str] = None, batch_size=1,
                 max_length: Optional[int] = None, model=None, tokenizer=None,
                 device=None, max_batch_size=None):
        # device and max_batch_size: lm_eval passes them to every model; MLX has one device
        # and we run no batch-size search, so they go unused.
        super().__init__()
        if model is None:
            from .demo import demo_model_path

            model, tokenizer = load(pretrained or demo_model_path(), dtype or "auto",
                                    adapter_path)
        if tokenizer is None:
            raise ValueError(f"{pretrained}: has no tokenizer files; lm-eval needs one")
        self.model, self.tokenizer = model, tokenizer
        # lm_eval's "auto" batch size asks for a search we do not run: one request at a time.
        self.batch_size = 1 if str(batch_size).startswith("auto") else int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.max_length = int(max_length or min(DEFAULT_MAX_LENGTH, model.config.max_seq_len))
        if not 2 <= self.max_length <= model.config.max_seq_len:
            raise ValueError(f"max_length must be in [2, {model.config.max_seq_len}] (the "
                             f"model's context), got {max_length}")

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and a rolling text) is conditioned on: BOS, else EOS."""
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return [*self.tokenizer.eos_token_ids, *self.model.config.eos_token_ids][0]

    def _encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """(context ids, continuation ids). Encoded together and split, so that the
        continuation's tokens are the ones the whole text has (a tokenizer may merge across
        the boundary); spaces ending the context move to the continuation, where lm_eval's
        tasks mean them to be."""
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.prefix_token_id], self.tokenizer.encode(continuation,
                                                                 add_special_tokens=False)
        whole = self.tokenizer.encode(context + continuation)
        head = self.tokenizer.encode(context)
        if whole[: len(head)] == head and len(whole) > len(head):
            return head, whole[len(head):]
        # The boundary merged into one token: the parts encoded apart.
        return head, self.tokenizer.encode(continuation, add_special_tokens=False)

    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        pairs = [self._encode_pair(*request.args) for request in requests]
        # Longest first, batch_size per call: similar lengths, little padding.
        order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))
        results: List[Optional[Tuple[float, bool]]] = [None] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for index, result in zip(batch, self._score([pairs[i] for i in batch])):
                results[index] = result
                self.cache_hook.add_partial("loglikelihood", requests[index].args, result)
        return results

    def _score(self, pairs: Sequence[Tuple[List[int], List[int]]]) -> List[Tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding gives it) per pair,
        in one forward pass; contexts too long lose their oldest tokens."""
        rows = []
        for context, continuation in pairs:
            tokens = (context + continuation)[-(self.max_length + 1):]
            rows.append((tokens[:-1], min(len(continuation), len(tokens) - 1)))
        width = max(len(inputs) for inputs, _ in rows)
        # Right padding: causal attention keeps the real positions from seeing it.
        ids = mx.array([inputs + [0] * (width - len(inputs)) for inputs, _ in rows],
                       dtype=mx.int32)
        logits = self.model(ids).logits.astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(logprobs)
        results = []
        for row, ((inputs, count), (_, continuation)) in enumerate(zip(rows, pairs)):
            # Positions len(inputs) - count .. len(inputs) - 1 predict the continuation.
            scores = logprobs[row, len(inputs) - count : len(inputs)]
            targets = mx.array(continuation[-count:], dtype=mx.int32)
            picked = np.array(mx.take_along_axis(scores, targets[:, None], axis=-1)[:, 0])
            greedy = bool(mx.all(mx.argmax(scores, axis=-1) == targets).item())
            results.append((float(picked.astype(np.float64).sum()), greedy))
        return results

    def loglikelihood_rolling(self, requests) -> List[float]:
        sequences = [[self.prefix_token_id,
                      *self.tokenizer.encode(request.args[0], add_special_tokens=False)]
                     for request in requests]
        nlls = sequence_nlls(self.model, sequences, self.max_length, self.batch_size)
        results = []
        for request, (nll, _) in zip(requests, nlls):
            results.append(-nll)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, -nll)
        return results

    def generate_until(self, requests) -> List[str]:
        """Greedy unless a request asks for do_sample with a temperature; requests that
        sample alike run together, batch_size at a time."""
        settings = [self._generation_settings(request.args[1]) for request in requests]
        results: List[Optional[str]] = [None] * len(requests)
        groups: dict = {}
        for index, (temperature, _, _) in enumerate(settings):
            groups.setdefault(temperature, []).append(index)
        for temperature, indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                prompts = [self._generation_prompt(requests[i].args[0], settings[i][2])
                           for i in batch]
                texts = [""] * len(batch)
                for row, response in stream_batch_generate(
                        self.model, self.tokenizer, prompts, [settings[i][2] for i in batch],
                        temperature=temperature, stops=[settings[i][1] for i in batch]):
                    texts[row] += response.text
                for index, text in zip(batch, texts):
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return results

    @staticmethod
    def _generation_settings(gen_kwargs: dict) -> Tuple[float, List[str], int]:
        """(temperature, stop strings, max new tokens) of one request's gen_kwargs."""
        until = gen_kwargs.get("until") or []
        stops = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        if not gen_kwargs.get("do_sample", False):
            temperature = 0.0
        max_tokens = int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        return temperature, stops, max_tokens

    def _generation_prompt(self, context: str, max_tokens: int) -> List[int]:
        """The context's ids, its oldest dropped so that max_tokens more fit the context."""
        ids = self.tokenizer.encode(context) if context else [self.prefix_token_id]
        room = max(self.max_length - max_tokens, 1)
        return ids[-room:]


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
