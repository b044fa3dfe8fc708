"""/v1/chat/completions and /v1/completions: a request body becomes a Job for the worker, and
the job's events become OpenAI's response objects, whole or as stream chunks.

Chat prompts go through the model's chat template (with `tools` when given). A
`response_format` of json_object or json_schema adds a logits processor that keeps the output
valid JSON (matching the schema); tool calls are parsed from the output in the format the
template defines (tool_calls.py says which it recognises), and a named or required tool_choice
makes the model start the call and constrains its arguments to the function's parameters.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import List, Optional

from .. import tool_calls
from ..chat_template import ChatTemplateError
from ..errors import CheckpointError
from ..input_checks import check_text
from .protocol import APIError, Fields, Sampling, read_sampling
from .worker import Finished, Token


@dataclass
class Served:
    """What every request is served with."""
    model: object
    tokenizer: object
    model_id: str
    default_max_tokens: int


@dataclass
class Reply:
    """One request's answer as it forms: the text, the tokens' logprobs, and how to write it."""
    served: Served
    chat: bool
    sampling: Sampling
    tool_format: Optional[object] = None
    """The template's tool-call format when the output is to be parsed for tool calls."""
    forced_prefix: str = ""
    forced_suffix: str = ""
    """Text the model was made to start with and the text that closes it (a forced tool call,
    whose arguments alone the model writes): both are part of the output."""
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    logprobs: list = field(default_factory=list)
    finished: Optional[Finished] = None

    def __post_init__(self):
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def add(self, event: Token) -> None:
        self.text += event.text
        if event.logprob is not None:
            self.logprobs.append(event)

    def usage(self) -> dict:
        done = self.finished
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}

    def _head(self, chunk: bool) -> dict:
        kind = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created,
                "model": self.served.model_id}

    def _message(self) -> tuple:
        """(message, finish_reason) of the whole reply."""
        reason = self.finished.reason
        text = self.forced_prefix + self.text + self.forced_suffix
        if self.tool_format is None:
            return {"role": "assistant", "content": text}, reason
        content, calls = tool_calls.parse_tool_calls(text, self.tool_format)
        if not calls:
            return {"role": "assistant", "content": text}, reason
        return {"role": "assistant", "content": content or None, "tool_calls": calls}, "tool_calls"

    def whole(self) -> dict:
        """The non-streamed response."""
        if self.chat:
            message, reason = self._message()
            choice = {"index": 0, "message": message, "finish_reason": reason,
                      "logprobs": self._chat_logprobs(self.logprobs)}
        else:
            choice = {"index": 0, "text": self.text, "finish_reason": self.finished.reason,
                      "logprobs": self._completion_logprobs(self.logprobs)}
        return {**self._head(False), "choices": [choice], "usage": self.usage()}

    def first_chunks(self) -> List[dict]:
        if not self.chat:
            return []
        return [self._chunk({"role": "assistant", "content": ""}, None)]

    def chunks_for(self, event: Token) -> List[dict]:
        """The stream chunks of one token: none while a tool call may be forming (it is sent
        whole at the end)."""
        self.add(event)
        if self.tool_format is not None or (not event.text and event.logprob is None):
            return []
        if self.chat:
            return [self._chunk({"content": event.text}, None,
                                self._chat_logprobs([event]) if event.logprob is not None else None)]
        return [self._chunk(event.text, None, self._completion_logprobs([event]))]

    def last_chunks(self, finished: Finished) -> List[dict]:
        self.finished = finished
        if not self.chat:
            chunks = [self._chunk("", finished.reason)]
        elif self.tool_format is None:
            chunks = [self._chunk({}, finished.reason)]
        else:
            message, reason = self._message()
            delta = {"content": message.get("content")}
            if "tool_calls" in message:
                delta["tool_calls"] = [{"index": i, **call}
                                       for i, call in enumerate(message["tool_calls"])]
            chunks = [self._chunk(delta, None), self._chunk({}, reason)]
        if self.sampling.include_usage:
            chunks.append({**self._head(True), "choices": [], "usage": self.usage()})
        return chunks

    def _chunk(self, delta, reason: Optional[str], logprobs=None) -> dict:
        choice = ({"index": 0, "delta": delta} if self.chat else {"index": 0, "text": delta})
        choice.update(logprobs=logprobs, finish_reason=reason)
        return {**self._head(True), "choices": [choice]}

    def _token_text(self, token: int) -> str:
        return self.served.tokenizer.decode([token])

    def _chat_logprobs(self, events: List[Token]) -> Optional[dict]:
        if self.sampling.logprobs is None:
            return None

        def entry(token: int, logprob: float) -> dict:
            return {"token": self._token_text(token), "logprob": logprob,
                    "bytes": list(self.served.tokenizer.token_bytes(token))}

        return {"content": [{**entry(e.token, e.logprob),
                             "top_logprobs": [entry(t, lp) for t, lp in e.top_logprobs]}
                            for e in events]}

    def _completion_logprobs(self, events: List[Token]) -> Optional[dict]:
        if self.sampling.logprobs is None:
            return None
        offsets, at = [], len(self.text) - sum(len(e.text) for e in events)
        for e in events:
            offsets.append(at)
            at += len(e.text)
        return {"tokens": [self._token_text(e.token) for e in events],
                "token_logprobs": [e.logprob for e in events],
                "top_logprobs": [{self._token_text(t): lp for t, lp in e.top_logprobs}
                                 for e in events],
                "text_offset": offsets}


def _check_context(served: Served, prompt: List[int], sampling: Sampling, param: str) -> int:
    """The max_tokens to run with; refuses prompts (the field `param`) and lengths beyond the
    context."""
    context = served.model.config.max_seq_len
    if not prompt:
        raise APIError(400, "the prompt is empty", param)
    if len(prompt) >= context:
        raise APIError(400, f"the prompt has {len(prompt)} tokens; this model's context is "
                            f"{context}", param, code="context_length_exceeded")
    room = context - len(prompt)
    if sampling.max_tokens is not None and sampling.max_tokens > room:
        raise APIError(400, f"max_tokens {sampling.max_tokens} and the prompt's {len(prompt)} "
                            f"tokens exceed this model's context of {context}", "max_tokens",
                       code="context_length_exceeded")
    return min(sampling.max_tokens or served.default_max_tokens, room)


def _text(text: str, param: str) -> str:
    """Text a tokenizer takes: JSON's \\ud800 escapes give lone surrogates, which it refuses."""
    try:
        return check_text(text, f"'{param}'")
    except CheckpointError as error:
        raise APIError(422, str(error), param) from None


def _json_processors(served: Served, fields: Fields) -> list:
    """The logits processors `response_format` asks for."""
    response_format = fields.within("response_format")
    kind = response_format.get("type", "string", "text",
                               lambda v: v in ("text", "json_object", "json_schema"),
                               "text, json_object or json_schema")
    if kind == "text":
        return []
    schema = None
    if kind == "json_schema":
        described = response_format.within("json_schema")
        schema = described.get("schema", "object", {})
    return [_constraint(served, schema, "response_format.json_schema.schema")]


def _constraint(served: Served, schema: Optional[dict], param: str):
    from .. import constrained

    try:
        return constrained.json_processor(
            served.tokenizer, schema,
            eos_token_ids=[*served.tokenizer.eos_token_ids, *served.model.config.eos_token_ids])
    except RecursionError:
        raise APIError(400, f"{param}: the schema is nested too deeply", param) from None
    except ValueError as error:
        raise APIError(400, f"{param}: {error}", param) from None


def prepare_completion(served: Served, body: dict) -> tuple:
    """(Job fields, Reply) for /v1/completions."""
    fields = Fields(body)
    sampling = read_sampling(fields, chat=False)
    prompt = fields.get("prompt", "string|array", None)
    if prompt is None:
        raise APIError(422, "'prompt' is required", "prompt")
    if isinstance(prompt, list):  # [text] or [ids] or ids: one prompt (n = 1)
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list) and not all(isinstance(t, int) and not isinstance(t, bool)
                                                for t in prompt):
            raise APIError(422, "'prompt' must be a string, an array of token ids, or an array "
                                "holding one of those", "prompt")
    vocab = served.model.config.vocab_size
    if isinstance(prompt, str):
        ids = served.tokenizer.encode(_text(prompt, "prompt"))
    else:
        ids = list(prompt)
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(422, f"'prompt' holds token ids outside the vocabulary [0, {vocab})",
                           "prompt")
    max_tokens = _check_context(served, ids, sampling, "prompt")
    reply = Reply(served, chat=False, sampling=sampling)
    return dict(prompt=ids, max_tokens=max_tokens, sampling=sampling,
                processors=_json_processors(served, fields)), reply


def _messages(fields: Fields) -> list:
    messages = fields.get("messages", "array", None, lambda v: len(v) > 0, "a non-empty array")
    if messages is None:
        raise APIError(422, "'messages' is required", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(422, f"'messages[{index}]' must be an object", "messages")
        Fields(message, f"messages[{index}].").get(
            "role", "string", None, lambda v: v in ("system", "developer", "user", "assistant", "tool"),
            "one of system, developer, user, assistant, tool")
    try:
        return tool_calls.messages_for_template(messages)
    except ValueError as error:
        raise APIError(422, str(error), "messages") from None


def _tools(fields: Fields, tokenizer) -> tuple:
    """(tools for the template, tool_choice, the template's tool-call format or None)."""
    tools = fields.get("tools", "array", None)
    choice = fields.get("tool_choice", "string|object", "auto" if tools else "none")
    if not tools:
        return None, "none", None
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise APIError(422, f"'tools[{index}]' must be a function tool: {{\"type\": "
                                "\"function\", \"function\": {\"name\": ...}}", "tools")
        if not Fields(tool, f"tools[{index}].").within("function").get("name", "string", ""):
            raise APIError(422, f"'tools[{index}].function.name' is required", "tools")
    try:
        shown = tool_calls.renders_tools(tokenizer)
    except (ChatTemplateError, CheckpointError) as error:
        raise APIError(400, " ".join(str(error).split()), "tools") from None
    if not shown:
        raise APIError(400, "this model's chat template does not render tools; send the "
                            "request without 'tools'", "tools")
    if isinstance(choice, str) and choice not in ("none", "auto", "required"):
        raise APIError(422, "'tool_choice' must be none, auto, required or "
                            "{\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    return tools, choice, tool_calls.tool_call_format(tokenizer.chat_template)


def _forced_call(served: Served, tools: list, choice, call_format) -> tuple:
    """(text the reply starts with, text that closes it, the constraint on the arguments the
    model writes between them) for a required or named tool call."""
    if isinstance(choice, dict):
        name = Fields(choice, "tool_choice.").within("function").get("name", "string", None)
    else:  # required: the only tool, or refused (choosing among several is the model's job)
        names = [tool.get("function", {}).get("name") for tool in tools]
        if len(names) != 1:
            raise APIError(400, "tool_choice 'required' with several tools is not supported; "
                                "name one", "tool_choice")
        name = names[0]
    function = next((tool.get("function", {}) for tool in tools
                     if tool.get("function", {}).get("name") == name), None)
    if function is None:
        raise APIError(422, f"tool_choice names '{name}', which is not among the tools",
                       "tool_choice")
    if call_format is None:
        raise APIError(400, "this model's chat template defines no tool-call format to force",
                       "tool_choice")
    prefix, suffix = tool_calls.forced_call_text(call_format, name)
    schema = function.get("parameters") or {"type": "object"}
    return prefix, suffix, _constraint(served, schema, "tools[].function.parameters")


def prepare_chat(served: Served, body: dict) -> tuple:
    """(Job fields, Reply) for /v1/chat/completions."""
    fields = Fields(body)
    sampling = read_sampling(fields, chat=True)
    messages = _messages(fields)
    tools, choice, call_format = _tools(fields, served.tokenizer)
    processors = _json_processors(served, fields)
    prefix = suffix = ""
    if tools and (choice == "required" or isinstance(choice, dict)):
        if processors:
            raise APIError(400, "a forced tool call and response_format cannot be combined",
                           "response_format")
        prefix, suffix, constraint = _forced_call(served, tools, choice, call_format)
        processors = [constraint]
    tokenizer = served.tokenizer
    if not tokenizer.chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             **({"tools": tools} if tools else {}))
    except (ChatTemplateError, CheckpointError) as error:
        raise APIError(400, " ".join(str(error).split()), "messages") from None
    ids = tokenizer.encode(_text(text + prefix, "messages"), add_special_tokens=False)
    max_tokens = _check_context(served, ids, sampling, "messages")
    reply = Reply(served, chat=True, sampling=sampling,
                  tool_format=call_format if tools and choice != "none" else None,
                  forced_prefix=prefix, forced_suffix=suffix)
    return dict(prompt=ids, max_tokens=max_tokens, sampling=sampling,
                processors=processors), reply


def dumps(chunk: dict) -> str:
    return json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
