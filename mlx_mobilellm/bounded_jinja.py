"""A Jinja sandbox that bounds how much a template can make, not only what it can touch.

jinja2's ImmutableSandboxedEnvironment keeps a template away from Python's internals and from
changing its inputs, but lets it ask for any amount of work: `'a' * 10**10`, `'x'.ljust(10**9)`,
`'%1000000000d' % 1`, `10 ** 10**8`, a `replace` that doubles a string in a loop, or a list that
holds the previous one twice, forty times over, whose text is a terabyte. Each of those ends in ONE
operation in C, which no time limit can interrupt (the thread holds the GIL until it returns), so
its size has to be refused before it runs. The rule here: no value a render makes, and not its
output, may be longer than `Budget.limit` characters (the caller sets it), to within a small
constant factor (repr and escaping).

- Operations that can multiply their input are bounded BEFORE they run, from their arguments:
  `*`, `**` and `%` (binary operators the sandbox lets us intercept); the str/bytes methods that
  pad, repeat, replace, join or translate, and int.to_bytes (`call`); str.format (a formatter that
  checks each field); the filters that pad, replace, join, format, batch or sum. Their results
  also draw on a budget for the whole render (GROWTH_PER_LIMIT limits), so that a loop cannot
  pile up many results that are each under the limit.
- Everything else is measured AFTER it runs, which is safe because its result is at most a
  constant times its (already bounded) inputs: the result of every call, filter and `+`; every
  list, tuple and dict literal (the code generator wraps them: a literal that holds a shared part
  twice is how a template doubles a value's text at each step); every item an iterator filter
  yields; every `~` join, block buffer and `{{ output }}`, as the text accumulates.
- `range` draws on a budget of numbers for the whole render; `lipsum` is removed.

A container's size is its text's length with each reference to a shared part counted again;
sizes are memoized, so measuring a list built from shared parts costs its own length, not its
expansion. What stays unbounded is time spent in Python-level work (nested loops over lists,
recursion): the caller stops that with a wall-clock limit (chat_template.py).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, MappingView
from functools import partial, wraps
from typing import Callable

from jinja2.compiler import CodeGenerator, optimizeconst
from jinja2.sandbox import (ImmutableSandboxedEnvironment, SandboxedEscapeFormatter,
                            SandboxedFormatter)
from markupsafe import Markup

MAX_RANGE_NUMBERS = 1_000_000
"""Numbers all range() calls of one render may give: real templates count through messages."""
MAX_INT_BITS = 1 << 16
"""Largest number a template may compute (about 20,000 digits)."""
GROWTH_PER_LIMIT = 16
"""Characters all padding, repetition, replace, join and formatting of one render may make, in
limits: real templates join and replace a few times per message."""
_MEMO_ENTRIES = 10_000
"""Container sizes remembered at once; the memo keeps each container alive (so that its id is
not reused), and forgetting them all when full keeps that memory bounded too."""


class RenderLimitError(Exception):
    """The template asked for more than a render may make; the message says what."""


class Budget:
    """What one render may still make: the limit on any one value, on the output, and the
    render-wide budgets of grown characters and range numbers."""

    def __init__(self, limit: int):
        self.limit = limit
        self.growth_left = GROWTH_PER_LIMIT * limit
        self.numbers_left = MAX_RANGE_NUMBERS
        self._sizes: dict = {}

    def size(self, value) -> int:
        """About the length of str(value); a part shared by reference counts each time."""
        if isinstance(value, (str, bytes, bytearray)):
            return len(value)
        if isinstance(value, int):
            return value.bit_length() // 3 + 1
        if not isinstance(value, (list, tuple, set, frozenset, dict, MappingView)):
            return 1
        known = self._sizes.get(id(value))
        if known is None:
            parts = [*value, *value.values()] if isinstance(value, dict) else value
            if len(self._sizes) >= _MEMO_ENTRIES:
                self._sizes.clear()
            known = self._sizes[id(value)] = (2 + sum(self.size(p) + 2 for p in parts), value)
        return known[0]

    def check(self, size: int) -> None:
        if size > self.limit:
            raise RenderLimitError(f"makes more than {self.limit:,} characters (in one value or "
                                   "in its output)")

    def made(self, value):
        """value, once measured within the limit; an iterator's items are measured as they come."""
        if isinstance(value, str):  # most values, and the quickest to measure
            self.check(len(value))
        elif isinstance(value, Iterator):
            return (self.made(item) for item in value)
        else:
            self.check(self.size(value))
        return value

    def grow(self, size: int) -> None:
        """Before an operation that can multiply its input: the most its result can hold."""
        self.check(size)
        self.growth_left -= size
        if self.growth_left < 0:
            raise RenderLimitError(
                f"makes more than {GROWTH_PER_LIMIT * self.limit:,} characters in all by "
                "padding, repeating, replacing, joining or formatting")

    def joined(self, pieces) -> str:
        """"".join(pieces), refused as soon as the text passes the limit."""
        text, length = [], 0
        for piece in pieces:
            length += len(piece)
            self.check(length)
            text.append(piece)
        return "".join(text)

    def numbers(self, *args) -> range:
        numbers = range(*args)
        # Sliced at what is left, the range is empty exactly when it fits (len() of a range
        # with more than sys.maxsize numbers would raise).
        if numbers[self.numbers_left:]:
            raise RenderLimitError(f"counts through more than {MAX_RANGE_NUMBERS:,} numbers "
                                   "with range()")
        self.numbers_left -= len(numbers)
        return numbers


_current = threading.local()


def budget() -> Budget:
    """The budget of the render running in this thread."""
    return _current.budget


def render(compile_template: Callable, variables: dict, limit: Callable[[int], int]) -> str:
    """compile_template() rendered with variables in this thread, within a budget whose limit
    is limit(size of the variables). Compiling runs inside the budget too: Jinja evaluates
    constant expressions, filters included, at compile time."""
    _current.budget = Budget(limit(Budget(0).size(variables)))
    try:
        return budget().joined(compile_template().generate(variables))
    finally:
        del _current.budget


# --- sizes of operations that multiply their input -------------------------------------------

def _as_text(value) -> str:
    return value if isinstance(value, str) else str(value)


def _printf_size(template, values) -> int:
    """Most characters `template % values` can make: each '%' shows one value (its repr at
    most), padded to the largest number written in the template or, with '*', given as a value."""
    text = template if isinstance(template, str) else template.decode("latin-1")
    values = (list(values.values()) if isinstance(values, dict) else
              values if isinstance(values, tuple) else (values,))
    widths = [int(n) for n in re.findall(r"\d+", text)]
    if "*" in text:
        widths += [abs(v) for v in values if isinstance(v, int)]
    widest_value = max((len(repr(v)) for v in values), default=0)
    return len(text) + text.count("%") * (max(widths, default=0) + widest_value)


def _replaced_size(text, old, new, count=-1) -> int:
    hits = text.count(old) if old else len(text) + 1
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * (len(new) - len(old))


def _joined_size(current: Budget, separator, items: list) -> int:
    return len(separator) * len(items) + sum(map(current.size, items))


def _check_product(current: Budget, left, right) -> None:
    if isinstance(left, int) and isinstance(right, int):
        _check_bits(left.bit_length() + right.bit_length())
    elif isinstance(right, int) and isinstance(left, (str, bytes, list, tuple)):
        current.grow(current.size(left) * max(right, 0))
    elif isinstance(left, int) and isinstance(right, (str, bytes, list, tuple)):
        current.grow(current.size(right) * max(left, 0))


def _check_power(base, exponent) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        _check_bits(base.bit_length() * exponent)


def _check_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise RenderLimitError(f"computes a number of more than {MAX_INT_BITS:,} bits")


# --- methods (through SandboxedEnvironment.call) ----------------------------------------------
# Each guard gets the budget, the bound method and its arguments, and calls it once bounded.

def _pad(current, method, width, *fill):
    current.grow(max(len(method.__self__), width))
    return method(width, *fill)


def _expand_tabs(current, method, tabsize=8):
    text = method.__self__
    current.grow(len(text) + text.count("\t" if isinstance(text, str) else b"\t") * max(tabsize, 0))
    return method(tabsize)


def _replace(current, method, old, new, count=-1):
    current.grow(_replaced_size(method.__self__, old, new, count))
    return method(old, new, count)


def _join(current, method, items):
    items = list(items)
    current.grow(_joined_size(current, method.__self__, items))
    return method(items)


def _translate(current, method, table):
    mapped = (table.values() if isinstance(table, dict) else
              table if isinstance(table, (list, tuple)) else ())
    current.grow(len(method.__self__) * max(map(current.size, mapped), default=1))
    return method(table)


def _to_bytes(current, method, length=1, *args, **kwargs):
    current.grow(length)
    return method(length, *args, **kwargs)


_METHOD_GUARDS = {"center": _pad, "ljust": _pad, "rjust": _pad, "zfill": _pad,
                  "expandtabs": _expand_tabs, "replace": _replace, "join": _join,
                  "translate": _translate, "to_bytes": _to_bytes}


# --- filters ----------------------------------------------------------------------------------
# Same idea, with Jinja's filter signatures (some take the environment or eval context first).

def _center_filter(current, center, value, width=80):
    current.grow(max(current.size(value), width))
    return center(value, width)


def _indent_filter(current, indent, s, width=4, *flags, **options):
    text = _as_text(s)
    per_line = width if isinstance(width, int) else len(width)
    current.grow(len(text) + (text.count("\n") + 1) * per_line)
    return indent(s, width, *flags, **options)


def _wordwrap_filter(current, wordwrap, environment, s, *args, **kwargs):
    # Each line break writes the wrap string (its only text argument), at most once a character.
    wrap = max([len(environment.newline_sequence)]
               + [len(a) for a in (*args, *kwargs.values()) if isinstance(a, str)])
    current.grow(len(_as_text(s)) * (1 + wrap))
    return wordwrap(environment, s, *args, **kwargs)


def _replace_filter(current, replace, eval_ctx, s, old, new, count=None):
    current.grow(_replaced_size(_as_text(s), _as_text(old), _as_text(new), count))
    return replace(eval_ctx, s, old, new, count)


def _join_filter(current, join, eval_ctx, value, d="", attribute=None):
    items = list(value)
    current.grow(_joined_size(current, _as_text(d), items))
    return join(eval_ctx, items, d, attribute)


def _format_filter(current, format_, value, *args, **kwargs):
    current.grow(_printf_size(_as_text(value), kwargs or args))
    return format_(value, *args, **kwargs)


def _batch_filter(current, batch, value, linecount, fill_with=None):
    current.grow(linecount)  # the last batch is filled up to linecount items in one step
    return batch(value, linecount, fill_with)


def _sum_filter(current, sum_, environment, iterable, attribute=None, start=0):
    if isinstance(start, (int, float)):
        return sum_(environment, iterable, attribute, start)
    items = list(iterable)
    # Summing sequences copies the partial result at every step, in one C loop.
    current.grow(len(items) * (current.size(start) + sum(map(current.size, items))))
    return sum_(environment, items, attribute, start)


_FILTER_GUARDS = {"center": _center_filter, "indent": _indent_filter,
                  "wordwrap": _wordwrap_filter, "replace": _replace_filter,
                  "join": _join_filter, "format": _format_filter, "batch": _batch_filter,
                  "sum": _sum_filter}


def _bounded_filter(name: str, function: Callable) -> Callable:
    guard = _FILTER_GUARDS.get(name)

    @wraps(function)  # keeps Jinja's pass_context / pass_environment mark
    def bounded(*args, **kwargs):
        current = budget()
        if guard is None:
            return current.made(function(*args, **kwargs))
        return current.made(guard(current, function, *args, **kwargs))

    return bounded


def _bounded_range(*args) -> range:
    return budget().numbers(*args)


# --- str.format -------------------------------------------------------------------------------

class _BoundedFields:
    """Formatter part: a field's widths are checked before it is formatted, its text after."""

    def format_field(self, value, format_spec):
        current = budget()
        current.grow(max(map(int, re.findall(r"\d+", format_spec)), default=0))
        text = super().format_field(value, format_spec)
        current.grow(len(text))
        return text


class _BoundedFormatter(_BoundedFields, SandboxedFormatter):
    pass


class _BoundedEscapeFormatter(_BoundedFields, SandboxedEscapeFormatter):
    pass


# --- the environment --------------------------------------------------------------------------

class _BoundedCodeGenerator(CodeGenerator):
    """Compiles list, tuple and dict literals into environment.made(...), and `~` into
    environment.joined(...), so that their results are measured."""

    def _measured(self, visit, node, frame) -> None:
        self.write("environment.made(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node, frame):
        self._measured(super().visit_List, node, frame)

    def visit_Dict(self, node, frame):
        self._measured(super().visit_Dict, node, frame)

    def visit_Tuple(self, node, frame):
        if node.ctx == "store":  # `{% for a, b in ... %}`: an assignment target
            return super().visit_Tuple(node, frame)
        self._measured(super().visit_Tuple, node, frame)

    @optimizeconst
    def visit_Concat(self, node, frame):
        # Jinja's own joins text with str_join (or markup_join under autoescape, which chat
        # templates do not use); this one checks the length as the pieces come.
        self.write("environment.joined(map(str, (")
        for part in node.nodes:
            self.visit(part, frame)
            self.write(", ")
        self.write(")))")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """An ImmutableSandboxedEnvironment whose renders stay within the budget of the render
    running in the thread (see `render`). `filters` are added, bounded like Jinja's own."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})
    code_generator_class = _BoundedCodeGenerator

    def __init__(self, filters: dict = None, **options):
        super().__init__(finalize=self.made, **options)
        del self.globals["lipsum"]
        self.globals["range"] = _bounded_range
        self.filters.update(filters or {})
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    def made(self, value):
        return budget().made(value)

    def joined(self, pieces) -> str:
        return budget().joined(pieces)

    def concat(self, pieces) -> str:
        """Joins every block, macro and {% set %} buffer (Jinja's is "".join)."""
        return budget().joined(pieces)

    def call_binop(self, context, operator, left, right):
        current = budget()
        if operator == "*":
            _check_product(current, left, right)
        elif operator == "**":
            _check_power(left, right)
        elif operator == "%" and isinstance(left, (str, bytes)):
            current.grow(_printf_size(left, right))
        return current.made(self.binop_table[operator](left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own spelling)
        current = budget()
        guard = _METHOD_GUARDS.get(getattr(__obj, "__name__", None))
        if guard is not None and isinstance(getattr(__obj, "__self__", None), (str, bytes, int)):
            __obj = partial(guard, current, __obj)
        return current.made(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        """str.format / format_map through a formatter that bounds each field."""
        if super().wrap_str_format(value) is None:
            return None
        template, is_map = value.__self__, value.__name__ == "format_map"
        formatter = (_BoundedEscapeFormatter(self, escape=template.escape)
                     if isinstance(template, Markup) else _BoundedFormatter(self))

        def bounded(*args, **kwargs):
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                args, kwargs = (), args[0]
            return type(template)(formatter.vformat(template, args, kwargs))

        return bounded
