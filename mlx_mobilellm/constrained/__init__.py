"""Constrained decoding to JSON: a logits processor that lets a model write only text that
begins valid JSON — any JSON object, or a value of a JSON Schema — and end only once that
value is complete (`response_format` of an OpenAI-compatible server).

How. The schema compiles to a tree of nodes (object, array, string, ...). A character-level
pushdown automaton reads the generated text: its state is a set of stacks with one frame per
open value (a set, because `anyOf` may keep several readings alive until the text tells them
apart). Each token's text is found once per tokenizer, and the texts are sorted, so that the
tokens that share a prefix form one contiguous range: a trie without nodes. Each step walks
that trie with the automaton and drops a branch at the first character it refuses; inside a
string, where nearly every token is fine, the walk takes the tokens without a quote, backslash
or control character in one numpy operation and runs only the others through the automaton.
Masks are cached per state, and grammars per (tokenizer, schema).

Limits, by design:
- Schemas: the subset check_schema accepts (see _KEYWORDS in schema.py); anything else is
  refused, never ignored. `$ref` points into the schema itself and must not be recursive.
- Token texts: a token is decoded after a fixed anchor token (so SentencePiece keeps its
  leading space). Special tokens and tokens whose text is not whole UTF-8 (byte-level pieces
  of a character) are never allowed: such characters can still be written as \\u escapes.
- Whitespace between tokens of the JSON is at most MAX_WHITESPACE characters in a row, none
  after the value; numbers have at most MAX_DIGITS digits in their integer and fraction parts
  and MAX_EXPONENT_DIGITS in their exponent; integers are written without fraction or
  exponent; enum values other than strings are written as json.dumps writes them, compactly.
  Each bound keeps a model from looping without end; none lets invalid JSON through.

The modules: nodes.py (what a schema compiles to), automaton.py (the frames that read the text
character by character), schema.py (check_schema and the compiler), tokens.py (the token table,
its walk, and the mask and grammar caches); this one holds the logits processor.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from .automaton import MAX_DIGITS, MAX_EXPONENT_DIGITS, MAX_WHITESPACE, is_complete
from .schema import check_schema
from .tokens import Grammar, grammar_for

__all__ = ["json_processor", "JsonProcessor", "check_schema", "MAX_WHITESPACE", "MAX_DIGITS",
           "MAX_EXPONENT_DIGITS"]


class JsonProcessor:
    """What json_processor returns: a LogitsProcessor for one generation. It reads the tokens
    generated since its last call from the history (the first call's history is the prompt)."""

    def __init__(self, grammar: Grammar, eos_token_ids: Sequence[int]):
        self.grammar = grammar
        self.eos = sorted(set(eos_token_ids))
        self.state = grammar.start
        self.prompt_length: Optional[int] = None
        self.consumed = 0

    @property
    def complete(self) -> bool:
        """Whether the text so far is a whole value (EOS may come)."""
        return any(is_complete(stack) for stack in self.state)

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        if self.prompt_length is None:
            self.prompt_length = history.size
        for token in history[self.prompt_length + self.consumed:].tolist():
            if token not in self.eos:  # a caller that goes on past EOS gets EOS again
                self.state = self.grammar.advance(self.state, token)
            self.consumed += 1
        width = logits.shape[-1]
        allowed = np.zeros(width, dtype=bool)
        known = min(width, self.grammar.table.vocab_size)
        allowed[:known] = self.grammar.mask(self.state)[:known]
        allowed[[token for token in self.eos if token < width]] = self.complete
        if not allowed.any():
            raise ValueError("no token of this tokenizer can continue the JSON here")
        return mx.where(mx.array(allowed), logits, -mx.inf)


def json_processor(tokenizer, schema: Optional[dict] = None,
                   eos_token_ids: Optional[Sequence[int]] = None) -> JsonProcessor:
    """A logits processor (one per generation) that keeps the generated text a prefix of
    JSON: of any JSON object when schema is None (OpenAI's {"type": "json_object"}), else of a
    value of the JSON Schema (the subset check_schema accepts; it raises ValueError for
    others). EOS ids are allowed once the value is complete, and then only they: pass the ids
    generation stops at (default: the tokenizer's). The first call for a tokenizer reads its
    vocabulary (about 0.2 s for 49152 tokens); later ones reuse it."""
    eos = list(tokenizer.eos_token_ids if eos_token_ids is None else eos_token_ids)
    if not eos:
        raise ValueError("constrained JSON ends on an EOS token, and the tokenizer names none: "
                         "pass eos_token_ids")
    return JsonProcessor(grammar_for(tokenizer, schema), eos)
