"""OpenAI request bodies in, checked field by field: each field has one expected JSON kind and a
rule for its value, and a bad one becomes an APIError naming it, with the status code and the
error JSON OpenAI's clients understand.

Status codes: 400 for a body that is not a JSON object or asks for something this server does
not do (n > 1, a prompt longer than the context), 401 for a wrong API key, 404 / 405 for routes,
413 for a body over the size limit, 422 for a field of the wrong kind or out of its range.
Fields this server does not know are ignored (clients send assorted extras); known ones it
cannot honour (logit_bias, n > 1, nonzero presence/frequency penalties) are refused rather than
silently dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

# Per JSON kind: the Python types json.loads gives (a bool is not a number here).
KINDS = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
         "array": (list,), "object": (dict,)}
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
"""Characters of one stop string: each token's text is checked against every prefix of each."""
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 kind: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = \
            status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise APIError(400, f"the request body is not valid JSON ({error})") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {_kind_of(body)}")
    return body


def _kind_of(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    name = next((k for k, types in KINDS.items() if isinstance(value, types)), "a value")
    return {"array": "an array", "object": "an object", "integer": "an integer"}.get(name, f"a {name}")


@dataclass
class Fields:
    """Typed reads of a request body; `where` prefixes field names (response_format.type)."""
    body: dict
    where: str = ""

    def get(self, name: str, kind: str, default: Any = None,
            valid: Optional[Callable[[Any], bool]] = None, rule: str = "") -> Any:
        """The field's value, or `default` when it is absent or null. `kind` may name several
        kinds ("string|array"); `valid` checks the value, `rule` says what it must be."""
        value = self.body.get(name)
        if value is None:
            return default
        param = self.where + name
        if not any(isinstance(value, KINDS[k]) and not (isinstance(value, bool) and k != "boolean")
                   for k in kind.split("|")):
            raise APIError(422, f"'{param}' must be {' or '.join(_a(k) for k in kind.split('|'))}, "
                                f"got {_kind_of(value)}", param)
        if isinstance(value, float) and not math.isfinite(value):
            raise APIError(422, f"'{param}' must be a finite number", param)
        if valid is not None and not valid(value):
            raise APIError(422, f"'{param}' must be {rule}, got {json.dumps(value)[:80]}", param)
        return value

    def within(self, name: str) -> "Fields":
        return Fields(self.get(name, "object", {}), f"{self.where}{name}.")


def _a(kind: str) -> str:
    return {"integer": "an integer", "array": "an array", "object": "an object"}.get(kind, f"a {kind}")


@dataclass
class Sampling:
    """What a request asks of the decode loop."""
    max_tokens: Optional[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: Optional[int]
    stop: list
    repetition_penalty: Optional[float]
    repetition_context_size: int
    logprobs: Optional[int]
    """None: no logprobs; n: each token's logprob and the n most likely alternatives."""
    stream: bool
    include_usage: bool

    @property
    def batchable(self) -> bool:
        """Whether the request can share a batch with others of the same sampling settings:
        only the samplers are shared; seeds and logits processors are one row's own."""
        return self.seed is None and self.repetition_penalty in (None, 1.0)

    def batch_key(self) -> tuple:
        """The sampler's settings; greedy ignores the filters, so all greedy requests share one."""
        if self.temperature == 0:
            return 0.0, 1.0, 0, 0.0
        return self.temperature, self.top_p, self.top_k, self.min_p


def read_sampling(fields: Fields, chat: bool) -> Sampling:
    """The sampling fields every endpoint shares (OpenAI's defaults: temperature 1, top_p 1)."""
    for name, neutral in (("n", 1), ("best_of", 1), ("presence_penalty", 0),
                          ("frequency_penalty", 0)):
        value = fields.get(name, "number", neutral)
        if value != neutral:
            raise APIError(400, f"'{name}' {value} is not supported: this server takes {neutral}",
                           name)
    if fields.get("logit_bias", "object", {}):
        raise APIError(400, "'logit_bias' is not supported", "logit_bias")
    positive = (lambda v: v >= 1, "at least 1")
    max_tokens = fields.get("max_completion_tokens", "integer", None, *positive) if chat else None
    if max_tokens is None:
        max_tokens = fields.get("max_tokens", "integer", None, *positive)
    stop = fields.get("stop", "string|array", [],
                      lambda v: all(isinstance(s, str) and len(s) <= MAX_STOP_LENGTH
                                    for s in ([v] if isinstance(v, str) else v))
                      and (isinstance(v, str) or len(v) <= MAX_STOP_STRINGS),
                      f"a string or an array of at most {MAX_STOP_STRINGS} strings, each of at "
                      f"most {MAX_STOP_LENGTH} characters")
    stream = fields.get("stream", "boolean", False)
    options = fields.within("stream_options")
    return Sampling(
        max_tokens=max_tokens,
        temperature=fields.get("temperature", "number", 1.0, lambda v: 0 <= v <= 2, "in [0, 2]"),
        top_p=fields.get("top_p", "number", 1.0, lambda v: 0 < v <= 1, "in (0, 1]"),
        top_k=fields.get("top_k", "integer", 0, lambda v: v >= 0, "at least 0"),
        min_p=fields.get("min_p", "number", 0.0, lambda v: 0 <= v <= 1, "in [0, 1]"),
        seed=fields.get("seed", "integer", None, lambda v: 0 <= v < 2**64, "in [0, 2**64)"),
        stop=[stop] if isinstance(stop, str) else stop,
        repetition_penalty=fields.get("repetition_penalty", "number", None, lambda v: v > 0,
                                      "positive"),
        repetition_context_size=fields.get("repetition_context_size", "integer", 20, *positive),
        logprobs=_read_logprobs(fields, chat),
        stream=stream,
        include_usage=stream and options.get("include_usage", "boolean", False))


def _read_logprobs(fields: Fields, chat: bool) -> Optional[int]:
    """Chat: logprobs true and top_logprobs n; completions: logprobs n (legacy)."""
    top = (lambda v: 0 <= v <= MAX_TOP_LOGPROBS, f"in [0, {MAX_TOP_LOGPROBS}]")
    if not chat:
        return fields.get("logprobs", "integer", None, *top)
    wanted = fields.get("logprobs", "boolean", False)
    count = fields.get("top_logprobs", "integer", None, *top)
    if count is not None and not wanted:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (count or 0) if wanted else None
