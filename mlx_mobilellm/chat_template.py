"""Rendering a model's chat template (Jinja) without trusting it, the way transformers renders
them (trimmed blocks, tojson, raise_exception).

A chat template comes with the checkpoint, so its author may be hostile or careless. Three
layers stand between it and the process:
- jinja2's immutable sandbox: no access to Python internals, no changes to the messages;
- bounded_jinja.BoundedEnvironment: no value a render makes, and not its output, grows past a
  limit that scales with the conversation (MIN_OUTPUT_CHARS, OUTPUT_PER_INPUT_CHAR), and
  operations that would multiply a value past it are refused before they run;
- a wall clock (RENDER_SECONDS) for the Python-level work that is left, such as nested loops:
  the render runs in a worker thread of its own, and when it overruns, an exception is raised
  inside that thread (PyThreadState_SetAsyncExc, which Python delivers between bytecodes) and
  ChatTemplateError in the caller at once. This works from any thread, needs no signals, and
  costs one thread start per render (tens of microseconds; a render takes milliseconds).
Every failure, refusals by the template itself included, is one ChatTemplateError line that
blames the model's template and says what to do.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import threading
from functools import lru_cache, partial

from jinja2.exceptions import TemplateError

from .bounded_jinja import BoundedEnvironment, RenderLimitError, budget, render
from .errors import CheckpointError

RENDER_SECONDS = 5.0
"""Wall-clock limit of one render; real templates take milliseconds, even for long chats."""
MIN_OUTPUT_CHARS = 1_000_000
OUTPUT_PER_INPUT_CHAR = 4
"""The most characters a render may make, in its output or in any one value:
max(MIN_OUTPUT_CHARS, OUTPUT_PER_INPUT_CHAR x the size of the messages and other variables).
Real templates add a few dozen characters per message."""

_FIX = "fix the template, or use --ignore-chat-template"


class ChatTemplateError(CheckpointError):
    """The template refused the conversation or failed to render."""


def _raise(message: str):
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False, separators=None):
    """json.dumps as transformers' templates know it, written piece by piece so that an indent
    repeated on every line of a deep value cannot pass the render's limit unnoticed."""
    encoder = json.JSONEncoder(indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys,
                               separators=separators)
    return budget().joined(encoder.iterencode(value))


@lru_cache(maxsize=8)
def _compile(source: str):
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                             extensions=["jinja2.ext.loopcontrols"], filters={"tojson": _tojson})
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def _output_limit(input_chars: int) -> int:
    return max(MIN_OUTPUT_CHARS, OUTPUT_PER_INPUT_CHAR * input_chars)


def render_chat_template(source: str, messages: list, add_generation_prompt: bool = True,
                         **variables) -> str:
    variables = {**variables, "messages": messages, "add_generation_prompt": add_generation_prompt}
    return _within_time_limit(partial(_render, source, variables))


def _render(source: str, variables: dict) -> str:
    try:
        return render(partial(_compile, source), variables, _output_limit)
    except ChatTemplateError:
        raise
    except RenderLimitError as error:
        raise ChatTemplateError(f"the model's chat template {error}; {_FIX}") from None
    except RecursionError:
        raise ChatTemplateError(f"the model's chat template recursed too deeply; {_FIX}") from None
    except MemoryError:
        raise ChatTemplateError(f"the model's chat template ran out of memory; {_FIX}") from None
    except TemplateError as error:
        raise ChatTemplateError(f"the chat template failed to render: {error}") from None
    except (ArithmeticError, LookupError, TypeError, ValueError) as error:
        # What Python raises for an operation the template wrote ('a' + 1, 1 / 0,
        # '{0}'.format()): the template's fault, as much as a Jinja error is.
        raise ChatTemplateError(f"the chat template failed to render: "
                                f"{type(error).__name__}: {error}") from None


class _Overrun(BaseException):
    """Raised inside a render that ran out of time; a BaseException, so that nothing in Jinja
    catches it."""


def _within_time_limit(work):
    """work() in a worker thread, stopped after RENDER_SECONDS (see the module docstring)."""
    outcome = {}
    lock = threading.Lock()
    running = [True]

    def worker():
        try:
            try:
                outcome["value"] = work()
            finally:
                with lock:  # from here on, the caller sends no _Overrun
                    running[0] = False
        except BaseException as error:  # _Overrun included: this thread ends either way
            outcome["error"] = error

    thread = threading.Thread(target=worker, name="chat-template", daemon=True)
    thread.start()
    try:
        thread.join(RENDER_SECONDS)
    finally:  # also when the caller is interrupted (Ctrl-C)
        with lock:
            overran = running[0]
            if overran:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                           ctypes.py_object(_Overrun))
    if overran:
        raise ChatTemplateError(f"the model's chat template took more than {RENDER_SECONDS:g} "
                                f"seconds to render; {_FIX}")
    thread.join()  # it has finished the render; only the lines after it are left
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
