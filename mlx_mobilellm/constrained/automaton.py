"""The character-level pushdown automaton that reads JSON against compiled nodes (nodes.py):
a state is a set of stacks with one frame per open value, and each character leads each stack
to the stacks it allows (none: the character is refused). The bounds that keep a model from
looping without end (MAX_WHITESPACE, MAX_DIGITS, MAX_EXPONENT_DIGITS) are enforced here."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, List, NamedTuple, Optional, Tuple

if TYPE_CHECKING:  # the nodes build frames, so only their types are needed here
    from .nodes import ArrayNode, ObjectNode, StringNode

MAX_WHITESPACE = 8
"""Whitespace characters in a row: enough to indent a few levels, too few to loop on."""
MAX_DIGITS = 16
"""Digits of a number's integer part and of its fraction (a double holds 15 to 17)."""
MAX_EXPONENT_DIGITS = 2
"""Up to 1e99: a double ends at 1.8e308."""

WHITESPACE = frozenset(" \t\n\r")
DIGITS = frozenset("0123456789")
HEX = frozenset("0123456789abcdefABCDEF")
SHORT_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
                 "t": "\t"}

# What feeding a character to a frame gives (frame.feed returns a list of (kind, value)):
MORE = 0  # it took the character; value: the frames that replace it (itself, then any child)
DONE = 1  # it took the character and the value is complete; value: what the parent learns
PASS = 2  # the value was complete before this character (a number before ","): the parent
#           resumes with value and reads the character itself


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


def advance_all(stacks: list, ch: str) -> list:
    out = [following for stack in stacks for following in _advance(stack, ch)]
    return list(set(out)) if len(out) > 1 else out


def run(stacks: list, text: str) -> list:
    for ch in text:
        if not stacks:
            break
        stacks = advance_all(stacks, ch)
    return stacks


def is_complete(stack: tuple) -> bool:
    """Whether the text read is a whole value: the root alone again, or a number or literal
    that may end here."""
    return stack[0].done and (len(stack) == 1 or len(stack) == 2 and isinstance(
        stack[1], (NumberFrame, LiteralFrame)) and stack[1].can_end())


def accepts(node, text: str) -> bool:
    return any(is_complete(stack) for stack in run([(RootFrame(node, False, 0),)], text))
