"""The value nodes a schema compiles to (object, array, string, ...): compiled once per
schema; frames (automaton.py) point to them (compared by identity), and a node's start(ch) gives
the frames that a value of it beginning with ch opens."""

from __future__ import annotations

from typing import Optional

from .automaton import (DIGITS, MORE, OPEN, ArrayFrame, ChoiceFrame, LiteralFrame, NumberFrame,
                        ObjectFrame, StringFrame)


class UnionNode:
    """Any of several nodes (anyOf, a list of types): each starts a reading of its own."""

    def __init__(self, options: tuple):
        self.options = options

    def start(self, ch: str) -> list:
        return [outcome for option in self.options for outcome in option.start(ch)]


class ObjectNode:
    def __init__(self, properties: dict, required: frozenset, extra):
        self.properties = properties
        self.required = required
        self.extra = extra
        """The node of keys not in properties; None when additionalProperties is false."""

    def start(self, ch: str) -> list:
        return [(MORE, (ObjectFrame(self, OPEN, frozenset(), None, 0),))] if ch == "{" else []

    def key_frame(self, seen: frozenset) -> "ChoiceFrame":
        """The key after `seen` ones: an unwritten property or, when others are allowed, any
        name but those written (the same key twice would leave one value unchecked)."""
        free = self.extra is not None
        return ChoiceFrame.new(frozenset(self.properties) - seen,
                               seen if free else frozenset(), free)


class ArrayNode:
    def __init__(self, items, min_items: int, max_items: Optional[int]):
        self.items, self.min_items, self.max_items = items, min_items, max_items

    def start(self, ch: str) -> list:
        return [(MORE, (ArrayFrame(self, OPEN, 0, 0),))] if ch == "[" else []

    def counted(self, count: int) -> int:
        """The count a state keeps: past minItems, with no maxItems, more make no difference
        (so states repeat and their masks are cached)."""
        return count if self.max_items is not None else min(count, self.min_items)


class StringNode:
    def __init__(self, min_length: int, max_length: Optional[int]):
        self.min_length, self.max_length = min_length, max_length

    def start(self, ch: str) -> list:
        return [(MORE, (StringFrame(self, 0, ""),))] if ch == '"' else []

    def counted(self, count: int) -> int:
        return count if self.max_length is not None else min(count, self.min_length)


class ChoiceNode:
    """A string that must be one of these (a string enum)."""

    def __init__(self, values: frozenset):
        self.values = values

    def start(self, ch: str) -> list:
        return [(MORE, (ChoiceFrame.new(self.values, frozenset(), False),))] if ch == '"' else []


class NumberNode:
    def __init__(self, integer: bool):
        self.integer = integer

    def start(self, ch: str) -> list:
        if ch == "-":
            return [(MORE, (NumberFrame(self.integer, "minus", 0),))]
        if ch in DIGITS:
            return [(MORE, (NumberFrame(self.integer, "zero" if ch == "0" else "int", 1),))]
        return []


class LiteralNode:
    """Exact texts: true, false, null, enum values other than strings."""

    def __init__(self, texts: tuple):
        self.texts = texts

    def start(self, ch: str) -> list:
        return LiteralFrame(self.texts, "").feed(ch)


ANY = UnionNode(())
ANY_OBJECT = ObjectNode({}, frozenset(), ANY)
ANY.options = (ANY_OBJECT, ArrayNode(ANY, 0, None), StringNode(0, None), NumberNode(False),
               LiteralNode(("true", "false", "null")))
