"""From characters to tokens: a tokenizer's token texts as a sorted table (a trie without
nodes) that the automaton walks to find each step's mask, the masks cached per state, and the
compiled grammars cached per (tokenizer, schema)."""

from __future__ import annotations

import json
import re
import threading
import weakref
from bisect import bisect_left
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .automaton import ChoiceFrame, RootFrame, StringFrame, advance_all, run
from .schema import compile_schema

MASK_CACHE = 512
"""Masks kept per grammar (bit-packed: 6 KB each for 49152 tokens, 16 KB for 128256)."""
GRAMMAR_CACHE = 16
"""Schemas kept compiled per tokenizer, with their masks, for the requests that repeat them."""

SPECIAL = re.compile(r'["\\\x00-\x1f]')
"""The characters that end, escape or are refused in a JSON string: all others are plain."""


class _TokenTable:
    """A tokenizer's tokens as text (None: never allowed), and those texts sorted with their
    ids: the tokens that share a prefix are one range [lo, hi), found by bisection."""

    def __init__(self, tokenizer):
        anchor = tokenizer.encode("a", add_special_tokens=False)
        before = tokenizer.decode(anchor)
        if not anchor or not before:
            raise ValueError(f"{tokenizer.source}: cannot decode tokens after a plain 'a', so "
                             "the text of its tokens is unknown")
        self.vocab_size = tokenizer.max_token_id + 1
        self.text_of: List[Optional[str]] = [None] * self.vocab_size
        for token in range(self.vocab_size):
            ids = anchor + [token]
            text = tokenizer.decode(ids)
            # Special tokens (those skip_special_tokens drops) are not text; U+FFFD: a piece of
            # a character, whose text depends on the tokens around it.
            if text == tokenizer.decode(ids, skip_special_tokens=True) and text.startswith(before):
                text = text[len(before):]
                if text and "\ufffd" not in text:
                    self.text_of[token] = text
        order = sorted((t for t, text in enumerate(self.text_of) if text is not None),
                       key=self.text_of.__getitem__)
        self.texts = [self.text_of[t] for t in order]
        self.ids = np.array(order, dtype=np.int64)
        self.lengths = np.array([len(text) for text in self.texts], dtype=np.int64)
        self.last_special = np.array([_last_special(text) for text in self.texts], dtype=np.int64)

    def walk(self, state: Sequence[tuple]) -> np.ndarray:
        """allowed[i]: whether the i-th sorted token may come next in one of these stacks."""
        texts = self.texts
        allowed = np.zeros(len(texts), dtype=bool)
        # Ranges reached inside a string, gathered per (stack, depth): at a key, most first
        # characters leave it past every name, in the same state, so one numpy pass does all.
        in_strings: Dict[Tuple[tuple, int], List[Tuple[int, int]]] = {}
        pending = [(list(state), 0, 0, len(texts))]
        while pending:  # (stacks after the prefix the range shares, its length, the range)
            stacks, depth, lo, hi = pending.pop()
            while lo < hi and len(texts[lo]) == depth:  # tokens that end here (sorted first)
                allowed[lo] = True
                lo += 1
            walked = []
            for stack in stacks:
                top = stack[-1]
                if isinstance(top, (StringFrame, ChoiceFrame)) and top.bulk():
                    in_strings.setdefault((stack, depth), []).append((lo, hi))
                else:
                    walked.append(stack)
            while walked and lo < hi:
                end = self._range_end(lo, hi, depth)
                following = advance_all(walked, texts[lo][depth])
                if following:
                    pending.append((following, depth + 1, lo, end))
                lo = end
        for (stack, depth), ranges in in_strings.items():
            region = np.zeros(len(texts), dtype=bool)
            for lo, hi in ranges:
                region[lo:hi] = True
            self._in_string(stack, depth, np.flatnonzero(region), allowed)
        return allowed

    def _range_end(self, lo: int, hi: int, depth: int) -> int:
        """The end of the range of tokens that share texts[lo][:depth + 1]."""
        prefix = self.texts[lo][: depth + 1]
        if ord(prefix[-1]) == 0x10FFFF:
            return hi
        return bisect_left(self.texts, prefix[:-1] + chr(ord(prefix[-1]) + 1), lo, hi)

    def _in_string(self, stack: tuple, depth: int, tokens: np.ndarray, allowed: np.ndarray):
        """Tokens (sorted indices) from `depth` on, for a stack inside a string that takes
        plain characters without changing but for their count: those without a special
        character there fit if the string has room for them; the others are run from their
        first special character, once per distinct (plain run, rest)."""
        top, below = stack[-1], stack[:-1]
        room = top.room()
        special = self.last_special[tokens] >= depth
        fits = ~special if room is None else ~special & (self.lengths[tokens] - depth <= room)
        allowed[tokens[fits]] = True
        results: Dict[Tuple[int, str], bool] = {}
        for index in tokens[special].tolist():
            text = self.texts[index]
            cut = SPECIAL.search(text, depth).start()
            key = (cut - depth if room is not None else 0, text[cut:])
            if key not in results:
                skipped = top.skip(cut - depth)
                results[key] = skipped is not None and bool(run([below + (skipped,)], text[cut:]))
            allowed[index] |= results[key]


def _last_special(text: str) -> int:
    found = SPECIAL.search(text[::-1])
    return -1 if found is None else len(text) - 1 - found.start()


class Grammar:
    """A compiled schema on one tokenizer's tokens, with the masks of the states seen."""

    def __init__(self, table: _TokenTable, root):
        self.table = table
        self.start = ((RootFrame(root, False, 0),),)
        self.masks: Dict[frozenset, np.ndarray] = {}
        self.lock = threading.Lock()

    def advance(self, state: tuple, token: int) -> tuple:
        text = self.table.text_of[token] if 0 <= token < self.table.vocab_size else None
        following = run(list(state), text) if text is not None else []
        if not following:
            raise ValueError(f"token {token} ({text!r}) cannot continue the JSON here: was a "
                             "logits processor applied after json_processor's?")
        return tuple(following)

    def mask(self, state: tuple) -> np.ndarray:
        """(vocab_size,) bool: the tokens whose text may come next (a fresh array)."""
        key = frozenset(state)
        with self.lock:
            packed = self.masks.get(key)
        if packed is None:
            mask = np.zeros(self.table.vocab_size, dtype=bool)
            mask[self.table.ids[self.table.walk(state)]] = True
            packed = np.packbits(mask)
            with self.lock:
                if len(self.masks) >= MASK_CACHE:
                    del self.masks[next(iter(self.masks))]
                self.masks[key] = packed
        return np.unpackbits(packed, count=self.table.vocab_size).view(bool)


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
"""tokenizer -> (its _TokenTable, {schema as JSON: Grammar})"""
_TABLES_LOCK = threading.Lock()


def grammar_for(tokenizer, schema: Optional[dict]) -> Grammar:
    """The Grammar of schema on tokenizer's tokens: cached, with the token table, per tokenizer."""
    root = compile_schema(schema)
    key = json.dumps(schema, sort_keys=True)
    with _TABLES_LOCK:
        if tokenizer not in _TABLES:
            _TABLES[tokenizer] = (_TokenTable(tokenizer), {})
        table, grammars = _TABLES[tokenizer]
        if key not in grammars:
            if len(grammars) >= GRAMMAR_CACHE:
                del grammars[next(iter(grammars))]
            grammars[key] = Grammar(table, root)
        return grammars[key]
