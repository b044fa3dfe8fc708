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
- Schemas: the subset check_schema accepts (see _KEYWORDS); anything else is refused, never
  ignored. `$ref` points into the schema itself and must not be recursive.
- Token texts: a token is decoded after a fixed anchor token (so SentencePiece keeps its
  leading space). Special tokens and tokens whose text is not whole UTF-8 (byte-level pieces
  of a character) are never allowed: such characters can still be written as \\u escapes.
- Whitespace between tokens of the JSON is at most MAX_WHITESPACE characters in a row, none
  after the value; numbers have at most MAX_DIGITS digits in their integer and fraction parts
  and MAX_EXPONENT_DIGITS in their exponent; integers are written without fraction or
  exponent; enum values other than strings are written as json.dumps writes them, compactly.
  Each bound keeps a model from looping without end; none lets invalid JSON through.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from bisect import bisect_left
from functools import lru_cache
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple
from urllib.parse import unquote

import mlx.core as mx
import numpy as np

MAX_WHITESPACE = 8
"""Whitespace characters in a row: enough to indent a few levels, too few to loop on."""
MAX_DIGITS = 16
"""Digits of a number's integer part and of its fraction (a double holds 15 to 17)."""
MAX_EXPONENT_DIGITS = 2
"""Up to 1e99: a double ends at 1.8e308."""
MASK_CACHE = 512
"""Masks kept per grammar (bit-packed: 6 KB each for 49152 tokens, 16 KB for 128256)."""
GRAMMAR_CACHE = 16
"""Schemas kept compiled per tokenizer, with their masks, for the requests that repeat them."""

WHITESPACE = frozenset(" \t\n\r")
DIGITS = frozenset("0123456789")
HEX = frozenset("0123456789abcdefABCDEF")
SHORT_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
                 "t": "\t"}
SPECIAL = re.compile(r'["\\\x00-\x1f]')
"""The characters that end, escape or are refused in a JSON string: all others are plain."""

# What feeding a character to a frame gives (frame.feed returns a list of (kind, value)):
MORE = 0  # it took the character; value: the frames that replace it (itself, then any child)
DONE = 1  # it took the character and the value is complete; value: what the parent learns
PASS = 2  # the value was complete before this character (a number before ","): the parent
#           resumes with value and reads the character itself


# ---------------------------------------------------------------------------------------------
# Schema nodes. Compiled once per schema; frames point to them (compared by identity).

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


# ---------------------------------------------------------------------------------------------
# Frames: immutable and hashable, so that a state can key the mask cache and be shared by the
# branches of the walk. Every state a frame can reach can still be completed (so no mask is
# ever empty): e.g. a comma is refused where no further key or item may come.

OPEN, KEY, COLON, VALUE, AFTER, ITEM = range(6)


def _space(frame) -> list:
    return [(MORE, (frame._replace(ws=frame.ws + 1),))] if frame.ws < MAX_WHITESPACE else []


def _open(parent, node, ch: str) -> list:
    """A value of `node` beginning with ch, as a child of `parent` (what the frame that opens
    it becomes once the value is done)."""
    return [(MORE, (parent,) + value) if kind == MORE else (MORE, (parent.resume(value),))
            for kind, value in node.start(ch)]


class RootFrame(NamedTuple):
    node: object
    done: bool  # the value has begun (it is complete once this frame is alone again)
    ws: int

    def feed(self, ch: str) -> list:
        if self.done:
            return []
        if ch in WHITESPACE:
            return _space(self)
        return _open(RootFrame(self.node, True, 0), self.node, ch)

    def resume(self, _) -> "RootFrame":
        return self


class ObjectFrame(NamedTuple):
    node: ObjectNode
    phase: int  # OPEN (after "{"), KEY (after ","), COLON, VALUE (after ":"), AFTER a value
    seen: frozenset  # the keys written
    key: Optional[str]  # in COLON and VALUE: the key (None: one outside the names tracked)
    ws: int

    def feed(self, ch: str) -> list:
        if ch in WHITESPACE:
            return _space(self)
        node, phase, seen = self.node, self.phase, self.seen
        if ch == "}" and phase in (OPEN, AFTER):
            return [(DONE, None)] if node.required <= seen else []
        if ch == '"' and (phase == KEY or phase == OPEN and self.room()):
            return [(MORE, (ObjectFrame(node, COLON, seen, None, 0), node.key_frame(seen)))]
        if ch == ":" and phase == COLON:
            return [(MORE, (ObjectFrame(node, VALUE, seen, self.key, 0),))]
        if ch == "," and phase == AFTER and self.room():
            return [(MORE, (ObjectFrame(node, KEY, seen, None, 0),))]
        if phase == VALUE:
            return _open(ObjectFrame(node, AFTER, seen, None, 0),
                         node.properties.get(self.key, node.extra), ch)
        return []

    def room(self) -> bool:
        """Whether another key may come."""
        return self.node.extra is not None or not self.node.properties.keys() <= self.seen

    def resume(self, key: Optional[str]) -> "ObjectFrame":
        if self.phase != COLON:
            return self
        return self._replace(key=key, seen=self.seen if key is None else self.seen | {key})


class ArrayFrame(NamedTuple):
    node: ArrayNode
    phase: int  # OPEN (after "["), ITEM (after ","), AFTER an item
    count: int
    ws: int

    def feed(self, ch: str) -> list:
        if ch in WHITESPACE:
            return _space(self)
        node, phase, count = self.node, self.phase, self.count
        more = node.max_items is None or count < node.max_items
        if ch == "]" and phase != ITEM:
            return [(DONE, None)] if count >= node.min_items else []
        if ch == "," and phase == AFTER and more:
            return [(MORE, (ArrayFrame(node, ITEM, count, 0),))]
        if phase == ITEM or phase == OPEN and more:
            return _open(ArrayFrame(node, AFTER, node.counted(count + 1), 0), node.items, ch)
        return []

    def resume(self, _) -> "ArrayFrame":
        return self


def _lex(escape: str, ch: str) -> Optional[Tuple[str, str]]:
    """One character of a string's content (not its closing quote): (the escape sequence
    still open, the character it completes or ""), or None if JSON refuses it. Surrogate
    pairs must pair: a lone one is not text."""
    if not escape:
        if ch == "\\":
            return "\\", ""
        return ("", ch) if ch >= " " else None
    sequence = escape + ch
    size = len(sequence)
    if size == 2:
        if ch == "u":
            return sequence, ""
        char = SHORT_ESCAPES.get(ch)
        return None if char is None else ("", char)
    if size in (7, 8):  # after a high surrogate, \u and its low half
        return (sequence, "") if ch == "\\u"[size - 7] else None
    if ch not in HEX:
        return None
    # \uDC00-\uDFFF can only follow a high surrogate; \uD800-\uDBFF must be followed by one.
    if size == 4 and sequence[2] in "dD" and ch in "cdefCDEF":
        return None
    if size == 9 and ch not in "dD" or size == 10 and ch not in "cdefCDEF":
        return None
    if size == 6:
        code = int(sequence[2:], 16)
        return (sequence, "") if 0xD800 <= code < 0xDC00 else ("", chr(code))
    if size == 12:
        high, low = int(sequence[2:6], 16), int(sequence[8:], 16)
        return "", chr(0x10000 + (high - 0xD800) * 0x400 + (low - 0xDC00))
    return sequence, ""


def _escape_forms(char: str) -> List[str]:
    """The escape sequences that write `char` (lower-case hex)."""
    forms = ["\\" + key for key, value in SHORT_ESCAPES.items() if value == char]
    code = ord(char)
    if code < 0x10000:
        forms.append(f"\\u{code:04x}")
    else:
        code -= 0x10000
        forms.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
    return forms


class StringFrame(NamedTuple):
    node: StringNode
    count: int  # characters so far (an escape is one), as node.counted keeps it
    escape: str

    def feed(self, ch: str) -> list:
        if not self.escape:
            if ch == '"':
                return [(DONE, None)] if self.count >= self.node.min_length else []
            if self.room() == 0:
                return []
        lexed = _lex(self.escape, ch)
        if lexed is None:
            return []
        escape, char = lexed
        count = self.node.counted(self.count + 1) if char else self.count
        return [(MORE, (StringFrame(self.node, count, escape),))]

    def room(self) -> Optional[int]:
        """How many more characters it takes (None: any number)."""
        return None if self.node.max_length is None else self.node.max_length - self.count

    def bulk(self) -> bool:
        """Whether any run of plain characters leaves it as skip(len(run)) does."""
        return not self.escape

    def skip(self, length: int) -> Optional["StringFrame"]:
        room = self.room()
        if room is not None and length > room:
            return None
        return StringFrame(self.node, self.node.counted(self.count + length), "")


class ChoiceFrame(NamedTuple):
    """A string that must spell one of `choices` (a string enum, an object's properties) or,
    when `free`, any other string but those in `avoid` (keys already written)."""
    choices: frozenset
    avoid: frozenset
    free: bool
    prefixes: frozenset  # of the names in choices and avoid: what content may be
    content: Optional[str]  # what it spells while that begins one of them; else None
    escape: str

    @staticmethod
    def new(choices: frozenset, avoid: frozenset, free: bool) -> "ChoiceFrame":
        if not choices | avoid:
            return OTHER_KEY
        return ChoiceFrame(choices, avoid, free, _prefixes(choices | avoid), "", "")

    def feed(self, ch: str) -> list:
        content = self.content
        if ch == '"' and not self.escape:
            chosen = content in self.choices or self.free and content not in self.avoid
            return [(DONE, content)] if content is None or chosen else []
        lexed = _lex(self.escape, ch)
        if lexed is None:
            return []
        escape, char = lexed
        if content is None or not char:
            # In an escape, a closed choice must still be able to end it with a fitting char.
            if content is not None and not self.free and not any(
                    form.startswith(escape.lower()) for name in self.choices
                    if len(name) > len(content) and name.startswith(content)
                    for form in _escape_forms(name[len(content)])):
                return []
            return [(MORE, (self._replace(escape=escape),))]
        content += char
        if content in self.prefixes:
            return [(MORE, (self._replace(content=content, escape=""),))]
        return [(MORE, (OTHER_KEY,))] if self.free else []

    def room(self) -> None:
        return None

    def bulk(self) -> bool:
        return self.content is None and not self.escape

    def skip(self, _) -> "ChoiceFrame":
        return self


OTHER_KEY = ChoiceFrame(frozenset(), frozenset(), True, frozenset(), None, "")
"""A free key past every tracked name: one state for all of them, so its mask is cached."""


@lru_cache(maxsize=1024)
def _prefixes(names: frozenset) -> frozenset:
    return frozenset(name[:end] for name in names for end in range(len(name) + 1))


class NumberFrame(NamedTuple):
    integer: bool
    phase: str  # where in -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? it stands
    digits: int  # digits in the current run

    def feed(self, ch: str) -> list:
        phase, fraction_ok = self.phase, not self.integer
        following = None
        if ch in DIGITS:
            if phase == "minus":
                following = ("zero", 1) if ch == "0" else ("int", 1)
            elif phase in ("int", "frac", "exp"):
                limit = MAX_EXPONENT_DIGITS if phase == "exp" else MAX_DIGITS
                following = (phase, self.digits + 1) if self.digits < limit else None
            elif phase in ("dot", "e", "sign"):
                following = ("frac" if phase == "dot" else "exp", 1)
        elif ch == "." and fraction_ok and phase in ("zero", "int"):
            following = ("dot", 0)
        elif ch in "eE" and fraction_ok and phase in ("zero", "int", "frac"):
            following = ("e", 0)
        elif ch in "+-" and phase == "e":
            following = ("sign", 0)
        if following is not None:
            return [(MORE, (NumberFrame(self.integer, *following),))]
        return [(PASS, None)] if self.can_end() else []

    def can_end(self) -> bool:
        return self.phase in ("zero", "int", "frac", "exp")


class LiteralFrame(NamedTuple):
    texts: tuple
    prefix: str

    def feed(self, ch: str) -> list:
        text = self.prefix + ch
        longer = [candidate for candidate in self.texts if candidate.startswith(text)]
        if not longer:
            return [(PASS, None)] if self.can_end() else []
        if longer == [text]:
            return [(DONE, None)]
        return [(MORE, (LiteralFrame(self.texts, text),))]

    def can_end(self) -> bool:
        return self.prefix in self.texts


def _advance(stack: tuple, ch: str) -> list:
    """The stacks one character leads to from `stack` (none: it is refused)."""
    top, below = stack[-1], stack[:-1]
    out = []
    for kind, value in top.feed(ch):
        if kind == MORE:
            out.append(below + value)
            continue
        resumed = below[:-1] + (below[-1].resume(value),)  # the root never finishes
        if kind == DONE:
            out.append(resumed)
        else:
            out.extend(_advance(resumed, ch))
    return out


def _advance_all(stacks: list, ch: str) -> list:
    out = [following for stack in stacks for following in _advance(stack, ch)]
    return list(set(out)) if len(out) > 1 else out


def _run(stacks: list, text: str) -> list:
    for ch in text:
        if not stacks:
            break
        stacks = _advance_all(stacks, ch)
    return stacks


def _complete(stack: tuple) -> bool:
    """Whether the text read is a whole value: the root alone again, or a number or literal
    that may end here."""
    return stack[0].done and (len(stack) == 1 or len(stack) == 2 and isinstance(
        stack[1], (NumberFrame, LiteralFrame)) and stack[1].can_end())


def _accepts(node, text: str) -> bool:
    return any(_complete(stack) for stack in _run([(RootFrame(node, False, 0),)], text))


# ---------------------------------------------------------------------------------------------
# Schemas

_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "deprecated",
                          "readOnly", "writeOnly", "$schema", "$id", "$comment", "$defs",
                          "definitions"})
"""Keywords that do not constrain the value: accepted and ignored."""
_KEYWORDS = frozenset({"type", "nullable", "enum", "const", "anyOf", "$ref", "properties",
                       "required", "additionalProperties", "items", "minItems", "maxItems",
                       "minLength", "maxLength"})
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


class _Compiler:
    def __init__(self, root):
        self.root = root
        self.refs: Dict[str, object] = {}
        self.open_refs: List[str] = []

    def node(self, schema, path: str):
        if schema is True:
            return ANY
        if schema is False:
            raise ValueError(f"the schema at {path} is false: no value satisfies it")
        if not isinstance(schema, dict):
            raise ValueError(f"the schema at {path} must be an object or a boolean, "
                             f"not {type(schema).__name__}")
        unknown = sorted(set(schema) - _KEYWORDS - _ANNOTATIONS)
        if unknown:
            raise ValueError(f"unsupported JSON Schema keyword '{unknown[0]}' at {path}; "
                             f"constrained decoding supports {', '.join(sorted(_KEYWORDS))}")
        for keyword, where in (("$ref", "the referenced schema"), ("anyOf", "each alternative")):
            if keyword in schema:
                others = sorted(set(schema) & _KEYWORDS - {keyword})
                if others:
                    raise ValueError(f"'{keyword}' at {path} must stand alone (but for "
                                     f"annotations): move '{others[0]}' into {where}")
                if keyword == "$ref":
                    return self.ref(schema["$ref"], path)
                return self.any_of(schema["anyOf"], path)
        if "enum" in schema or "const" in schema:
            return self.enum(schema, path)
        return self.typed(schema, path)

    def ref(self, ref, path: str):
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise ValueError(f"'$ref' at {path} is {ref!r}: only references into the schema "
                             "itself (#/$defs/NAME) are supported")
        if ref in self.open_refs:
            raise ValueError(f"'$ref' {ref!r} at {path} is recursive, which is not supported")
        if ref not in self.refs:
            target = self.root
            for part in ref[2:].split("/") if ref != "#" else ():
                part = unquote(part).replace("~1", "/").replace("~0", "~")
                if isinstance(target, dict) and part in target:
                    target = target[part]
                elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                    target = target[int(part)]
                else:
                    raise ValueError(f"'$ref' {ref!r} at {path} points to nothing in the schema")
            self.open_refs.append(ref)
            self.refs[ref] = self.node(target, ref)
            self.open_refs.pop()
        return self.refs[ref]

    def any_of(self, options, path: str):
        if not isinstance(options, list) or not options:
            raise ValueError(f"'anyOf' at {path} must be a non-empty array of schemas")
        return UnionNode(tuple(self.node(option, f"{path}/anyOf/{i}")
                               for i, option in enumerate(options)))

    def enum(self, schema: dict, path: str):
        if "enum" in schema and "const" in schema:
            raise ValueError(f"'enum' and 'const' together at {path} are not supported: keep one")
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if not isinstance(values, list) or not values:
            raise ValueError(f"'enum' at {path} must be a non-empty array")
        # The other keywords (type, minLength, ...) filter the values: the automaton of the
        # schema without enum/const is the validator.
        rest = self.typed({k: v for k, v in schema.items() if k not in ("enum", "const")}, path)
        texts = []
        for value in values:
            try:
                text = json.dumps(value, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError):
                raise ValueError(f"'enum' at {path} holds {value!r}, which is not JSON") from None
            if _accepts(rest, text):
                texts.append(text)
        if not texts:
            raise ValueError(f"no value of 'enum' or 'const' at {path} satisfies its other "
                             "keywords")
        strings = frozenset(json.loads(text) for text in texts if text.startswith('"'))
        others = tuple(dict.fromkeys(text for text in texts if not text.startswith('"')))
        if strings and others:
            return UnionNode((ChoiceNode(strings), LiteralNode(others)))
        return ChoiceNode(strings) if strings else LiteralNode(others)

    def typed(self, schema: dict, path: str):
        types = schema.get("type", [t for t in _TYPES if t != "integer"])
        types = [types] if isinstance(types, str) else types
        if not isinstance(types, list) or not types or any(t not in _TYPES for t in types):
            raise ValueError(f"'type' at {path} must be one of {', '.join(_TYPES)} or a "
                             f"non-empty array of them, not {types!r}")
        nullable = schema.get("nullable", False)
        if not isinstance(nullable, bool):
            raise ValueError(f"'nullable' at {path} must be true or false, not {nullable!r}")
        types = types + ["null"] * nullable
        if "number" in types:
            types = [t for t in types if t != "integer"]
        nodes = [self.of_type(t, schema, path) for t in dict.fromkeys(types)]
        return nodes[0] if len(nodes) == 1 else UnionNode(tuple(nodes))

    def of_type(self, kind: str, schema: dict, path: str):
        if kind == "object":
            return self.object(schema, path)
        if kind == "array":
            items = schema.get("items", True)
            if isinstance(items, list):
                raise ValueError(f"'items' at {path} is an array (one schema per position), "
                                 "which is not supported: give one schema for every item")
            low, high = self.bounds(schema, "minItems", "maxItems", path)
            return ArrayNode(self.node(items, f"{path}/items"), low, high)
        if kind == "string":
            return StringNode(*self.bounds(schema, "minLength", "maxLength", path))
        if kind in ("number", "integer"):
            return NumberNode(kind == "integer")
        return LiteralNode(("true", "false") if kind == "boolean" else ("null",))

    @staticmethod
    def bounds(schema: dict, low_key: str, high_key: str, path: str):
        def whole(key: str, value):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"'{key}' at {path} must be a whole number >= 0, not {value!r}")
            return value

        low = whole(low_key, schema.get(low_key, 0))
        high = whole(high_key, schema[high_key]) if high_key in schema else None
        if high is not None and low > high:
            raise ValueError(f"'{low_key}' ({low}) is above '{high_key}' ({high}) at {path}: no "
                             "value satisfies both")
        return low, high

    def object(self, schema: dict, path: str) -> ObjectNode:
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise ValueError(f"'properties' at {path} must be an object of schemas")
        nodes = {name: self.node(sub, f"{path}/properties/{name}")
                 for name, sub in properties.items()}
        extra = schema.get("additionalProperties", True)
        extra = None if extra is False else self.node(extra, f"{path}/additionalProperties")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(n, str) for n in required):
            raise ValueError(f"'required' at {path} must be an array of property names")
        for name in required:
            if name not in nodes:
                if extra is None:
                    raise ValueError(f"'required' at {path} names '{name}', which is not in "
                                     "'properties' while additionalProperties is false: no "
                                     "object satisfies both")
                nodes[name] = extra  # tracked like a property, so that it is counted
        return ObjectNode(nodes, frozenset(required), extra)


def _compile(schema: Optional[dict]):
    return ANY_OBJECT if schema is None else _Compiler(schema).node(schema, "#")


def check_schema(schema: Optional[dict]) -> None:
    """Raise ValueError (one line: the keyword and where) for a schema json_processor cannot
    enforce: keywords outside the subset (type, properties, required, additionalProperties,
    items, minItems, maxItems, minLength, maxLength, enum, const, anyOf, $ref, nullable;
    annotations such as description are ignored), recursive or outside $ref, anyOf or $ref
    beside other keywords, and schemas no value satisfies. None (any JSON object) passes."""
    _compile(schema)


# ---------------------------------------------------------------------------------------------
# Tokens

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
                following = _advance_all(walked, texts[lo][depth])
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
                results[key] = skipped is not None and bool(_run([below + (skipped,)], text[cut:]))
            allowed[index] |= results[key]


def _last_special(text: str) -> int:
    found = SPECIAL.search(text[::-1])
    return -1 if found is None else len(text) - 1 - found.start()


class _Grammar:
    """A compiled schema on one tokenizer's tokens, with the masks of the states seen."""

    def __init__(self, table: _TokenTable, root):
        self.table = table
        self.start = ((RootFrame(root, False, 0),),)
        self.masks: Dict[frozenset, np.ndarray] = {}
        self.lock = threading.Lock()

    def advance(self, state: tuple, token: int) -> tuple:
        text = self.table.text_of[token] if 0 <= token < self.table.vocab_size else None
        following = _run(list(state), text) if text is not None else []
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
"""tokenizer -> (its _TokenTable, {schema as JSON: _Grammar})"""
_TABLES_LOCK = threading.Lock()


def _grammar(tokenizer, schema: Optional[dict]) -> _Grammar:
    root = _compile(schema)
    key = json.dumps(schema, sort_keys=True)
    with _TABLES_LOCK:
        if tokenizer not in _TABLES:
            _TABLES[tokenizer] = (_TokenTable(tokenizer), {})
        table, grammars = _TABLES[tokenizer]
        if key not in grammars:
            if len(grammars) >= GRAMMAR_CACHE:
                del grammars[next(iter(grammars))]
            grammars[key] = _Grammar(table, root)
        return grammars[key]


# ---------------------------------------------------------------------------------------------
# The logits processor

class JsonProcessor:
    """What json_processor returns: a LogitsProcessor for one generation. It reads the tokens
    generated since its last call from the history (the first call's history is the prompt)."""

    def __init__(self, grammar: _Grammar, eos_token_ids: Sequence[int]):
        self.grammar = grammar
        self.eos = sorted(set(eos_token_ids))
        self.state = grammar.start
        self.prompt_length: Optional[int] = None
        self.consumed = 0

    @property
    def complete(self) -> bool:
        """Whether the text so far is a whole value (EOS may come)."""
        return any(_complete(stack) for stack in self.state)

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
    return JsonProcessor(_grammar(tokenizer, schema), eos)
