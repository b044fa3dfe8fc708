"""Rendering a model's chat template (Jinja) without trusting it: a sandboxed environment,
the way transformers renders them (trimmed blocks, tojson, raise_exception)."""

from __future__ import annotations

import datetime
import json
from functools import lru_cache

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import CheckpointError


class ChatTemplateError(CheckpointError):
    """The template refused the conversation or failed to render."""


def _raise(message: str):
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False, separators=None):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys,
                      separators=separators)


@lru_cache(maxsize=8)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def render_chat_template(source: str, messages: list, add_generation_prompt: bool = True,
                         **variables) -> str:
    try:
        return _compile(source).render(messages=messages,
                                       add_generation_prompt=add_generation_prompt, **variables)
    except ChatTemplateError:
        raise
    except TemplateError as error:
        raise ChatTemplateError(f"the chat template failed to render: {error}") from None
