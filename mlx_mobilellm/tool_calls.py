"""OpenAI-style tool calls in the formats models were trained on.

An OpenAI-compatible server needs four things from the model's side, all here:
- whether the chat template shows `tools` to the model at all (renders_tools): if not, a
  request with tools must be refused, since the model would never see them;
- which format the model writes its calls in, read off the template (tool_call_format):
    hermes  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call,
            possibly among text (Hermes 2 Pro / 3, Qwen2.5 / Qwen3, SmolLM3);
    llama3  the whole reply is `{"name": ..., "parameters": {...}}`, optionally after
            `<|python_tag|>` (Llama 3.1 / 3.2 / 3.3).
  A template that renders tools in no format recognised here still shows them to the model; its
  replies are returned as plain content (parse_tool_calls with fmt None);
- the reply split into content and OpenAI tool calls (parse_tool_calls), never raising on
  what the model wrote: anything that is not a well-formed call stays in the content;
- the request's messages as templates read them (messages_for_template), and for a forced call
  (`tool_choice` naming a function) the text the reply must start and end with
  (forced_call_text).

A forced call is generated as: prompt + prefix, then the arguments under the function's JSON
schema, then the suffix appended by the server; parse_tool_calls on prefix + generated text +
suffix gives the call back.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class ToolCallFormat:
    """How one model family writes a tool call: `opening`, a JSON object
    {"name": ..., arguments_key: {...}}, `closing`; `split(text)` gives (content, calls)."""
    name: str
    arguments_key: str
    opening: str
    closing: str
    split: Callable[[str], tuple]


def _openai_call(value) -> Optional[dict]:
    """The OpenAI form of a call object the model wrote; None when it is not one. Both argument
    keys are read in both formats: models trained on one also write the other."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        # Some models write the arguments as JSON text: kept as written when it is an object,
        # so that what the client gets always reads back (messages_for_template).
        try:
            if not isinstance(json.loads(arguments), dict):
                return None
        except json.JSONDecodeError:
            return None
        text = arguments
    elif isinstance(arguments, dict):
        text = json.dumps(arguments, ensure_ascii=False)
    else:
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": value["name"], "arguments": text}}


# A block that holds no other opening tag: in "<tool_call> junk <tool_call>{...}</tool_call>"
# the junk stays content and the good call is still read.
_TAGGED_CALL = re.compile(r"<tool_call>((?:(?!<tool_call>).)*?)</tool_call>", re.DOTALL)


def _split_tagged(text: str) -> tuple:
    pieces, calls, start = [], [], 0
    for block in _TAGGED_CALL.finditer(text):
        try:
            call = _openai_call(json.loads(block.group(1)))
        except json.JSONDecodeError:
            call = None
        if call is not None:
            pieces.append(text[start:block.start()])
            calls.append(call)
            start = block.end()
    if not calls:
        return text, []
    pieces.append(text[start:])
    return "\n".join(piece.strip() for piece in pieces if piece.strip()), calls


PYTHON_TAG = "<|python_tag|>"
# A whole reply that is JSON but has other keys is an answer in JSON, not a call.
_LLAMA_CALL_KEYS = {"name", "parameters", "arguments", "type"}
# Llama 3.2 may write several calls in one reply, separated by ";".
_SEPARATOR = re.compile(r"\s*;?\s*")


def _split_whole_reply(text: str) -> tuple:
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    decoder, calls, position = json.JSONDecoder(), [], 0
    while position < len(body):
        try:
            value, position = decoder.raw_decode(body, position)
        except json.JSONDecodeError:
            return text, []
        call = None
        if isinstance(value, dict) and set(value) <= _LLAMA_CALL_KEYS \
                and ("parameters" in value or "arguments" in value):
            call = _openai_call(value)
        if call is None:
            return text, []
        calls.append(call)
        position = _SEPARATOR.match(body, position).end()
    return ("", calls) if calls else (text, [])


HERMES = ToolCallFormat("hermes", "arguments", "<tool_call>\n", "\n</tool_call>", _split_tagged)
LLAMA3 = ToolCallFormat("llama3", "parameters", "", "", _split_whole_reply)


def tool_call_format(chat_template: Optional[str]) -> Optional[ToolCallFormat]:
    """The format a template teaches, from its source: HERMES when it writes `<tool_call>`,
    LLAMA3 when it writes a "parameters" key or `<|python_tag|>`; None for a template that does
    not mention tools or uses another format (Mistral's [TOOL_CALLS], pythonic calls, ...)."""
    if not chat_template or "tools" not in chat_template:
        return None
    if "<tool_call>" in chat_template:
        return HERMES
    if '"parameters"' in chat_template or PYTHON_TAG in chat_template:
        return LLAMA3
    return None


_PROBE_NAME = "mlx_mobilellm_probe_tool"
_PROBE_TOOL = {"type": "function", "function": {
    "name": _PROBE_NAME, "description": "Checks whether the template shows tools.",
    "parameters": {"type": "object", "properties": {}}}}


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template shows a request's `tools` to the model: its render
    of a one-message chat with a probe tool names the probe. (Comparing renders with and without
    tools would also count a template that reacts to `tools` without showing them.) An error of
    the template itself is raised (ChatTemplateError), as for any render."""
    if not tokenizer.chat_template:
        return False
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello."}],
                                         tokenize=False, tools=[_PROBE_TOOL])
    return _PROBE_NAME in text


def parse_tool_calls(text: str, fmt: Optional[ToolCallFormat]) -> tuple:
    """(content, tool_calls) of a reply: each call {"id": "call_...", "type": "function",
    "function": {"name": str, "arguments": JSON text of an object}}. Content is "" when the reply
    was only calls (OpenAI sends null there); with no calls, or fmt None, it is `text` as is."""
    return (text, []) if fmt is None else fmt.split(text)


def forced_call_text(fmt: ToolCallFormat, name: str) -> tuple:
    """(prefix, suffix) of a forced call to function `name`: the prefix ends where the
    arguments object starts, as the model's own calls read (`<tool_call>\\n{"name": "f",
    "arguments": `), and the suffix closes the call after that object."""
    prefix = f'{fmt.opening}{{"name": {json.dumps(name, ensure_ascii=False)}, ' \
             f'"{fmt.arguments_key}": '
    return prefix, "}" + fmt.closing


def messages_for_template(messages: list) -> list:
    """OpenAI request messages as chat templates read them (new dicts; other keys, such as a
    tool message's tool_call_id, kept):
    - content: a list of text parts joined with newlines; null as "" (templates concatenate it);
      parts of any other type (images, audio) raise ValueError;
    - an assistant's tool_calls: each function.arguments, JSON text in OpenAI, as the mapping
      templates iterate or `tojson` (Qwen's, Llama's); null or empty tool_calls dropped, since
      Llama's template tests `'tool_calls' in message`.
    ValueError names the message and field that is wrong."""
    if not isinstance(messages, list):
        raise ValueError("messages must be an array of message objects")
    return [_template_message(message, f"messages[{i}]") for i, message in enumerate(messages)]


def _template_message(message, where: str) -> dict:
    if not isinstance(message, dict):
        raise ValueError(f"{where} must be an object")
    result = {**message, "content": _text(message.get("content"), f"{where}.content")}
    calls = result.pop("tool_calls", None)
    if calls:
        if not isinstance(calls, list):
            raise ValueError(f"{where}.tool_calls must be an array")
        result["tool_calls"] = [_template_call(call, f"{where}.tool_calls[{j}]")
                                for j, call in enumerate(calls)]
    return result


def _text(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ValueError(f"{where} must be a string or an array of text parts")
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f'{where}[{k}]: only text parts {{"type": "text", "text": string}} '
                             f"are supported (got type {kind!r})")
        texts.append(part["text"])
    return "\n".join(texts)


def _template_call(call, where: str) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f'{where} must be {{"type": "function", "function": {{"name": ..., '
                         f'"arguments": ...}}}}')
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}.function.arguments is not JSON ({error})") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}.function.arguments must be a JSON object")
    return {**call, "function": {**function, "arguments": arguments}}
