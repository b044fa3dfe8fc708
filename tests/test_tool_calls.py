"""mlx_mobilellm.tool_calls: detecting a template's tool-call format, rendering tools and past
calls through Tokenizer.apply_chat_template, and reading calls out of model replies.

The templates are trimmed from the real ones (tools block, tool-call markup and tool results
kept as the originals write them; dates, builtin tools and reasoning modes left out)."""

from __future__ import annotations

import json

import pytest

from generation_helpers import CHAT_TEMPLATE, write_bpe_folder
from mlx_mobilellm import load_tokenizer
from mlx_mobilellm.tool_calls import (HERMES, LLAMA3, forced_call_text, messages_for_template,
                                      parse_tool_calls, renders_tools, tool_call_format)

# Qwen2.5-Instruct: tools as JSON lines in <tools>, calls in <tool_call> blocks, results as
# <tool_response> blocks inside a user turn.
QWEN25_TEMPLATE = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Llama 3.1 / 3.2 Instruct: tools (indented JSON) in the first user message, a past call as the
# whole assistant turn {"name": ..., "parameters": ...}, results in an "ipython" turn.
LLAMA31_TEMPLATE = r"""
{{- bos_token }}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# SmolLM3: tools in a namespace-built string in the system turn; it renders an assistant turn's
# content only (not its tool_calls), and tool results as user turns.
SMOLLM3_TEMPLATE = r"""
{%- set system_message = messages[0].content if messages[0].role == "system" else "" -%}
{{- "<|im_start|>system\n" -}}
{{- "## Custom Instructions\n\n" -}}
{{- (system_message or "You are a helpful AI assistant named SmolLM, trained by Hugging Face.") + "\n\n" -}}
{%- if tools -%}
    {{- "### Tools\n\n" -}}
    {%- set ns = namespace(xml_tool_string="You may call one or more functions to assist with the user query.\nYou are provided with function signatures within <tools></tools> XML tags:\n\n<tools>\n") -%}
    {%- for tool in tools[:] -%}
        {%- set ns.xml_tool_string = ns.xml_tool_string ~ (tool | tojson) ~ "\n" -%}
    {%- endfor -%}
    {{- ns.xml_tool_string + "</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>\n\n" -}}
{%- endif -%}
{{- "<|im_end|>\n" -}}
{%- for message in messages -%}
    {%- set content = message.content if message.content is string else "" -%}
    {%- if message.role == "user" or message.role == "tool" -%}
        {{ "<|im_start|>user\n" + content + "<|im_end|>\n" }}
    {%- elif message.role == "assistant" -%}
        {{ "<|im_start|>assistant\n" + content.lstrip("\n") + "<|im_end|>\n" }}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ "<|im_start|>assistant\n<think>\n\n</think>\n" }}
{%- endif -%}
"""

# Shows the tools but teaches no call format.
PLAIN_TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\nFunctions: ' + tools | tojson + '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TEMPLATES = {"qwen2.5": QWEN25_TEMPLATE, "llama3.1": LLAMA31_TEMPLATE,
             "smollm3": SMOLLM3_TEMPLATE, "plain tools": PLAIN_TOOLS_TEMPLATE,
             "chatml, no tools": CHAT_TEMPLATE}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now.",
                                         "parameters": {"type": "object", "properties": {}}}}
ARGUMENTS = {"city": "Paris", "unit": "celsius"}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A tiny BPE tokenizer per template, read from a model folder the way models are."""
    return {name: load_tokenizer(write_bpe_folder(tmp_path_factory.mktemp("tok"),
                                                  chat_template=template))
            for name, template in TEMPLATES.items()}


def only_call(text, fmt):
    content, calls = parse_tool_calls(text, fmt)
    assert len(calls) == 1, (content, calls)
    return content, calls[0]


# --- which templates define a format -------------------------------------------------------------

@pytest.mark.parametrize("template, expected", [
    (QWEN25_TEMPLATE, HERMES), (SMOLLM3_TEMPLATE, HERMES), (LLAMA31_TEMPLATE, LLAMA3),
    ("{% if tools %}{{ tools | tojson }}{% endif %}<|python_tag|>", LLAMA3),
    (PLAIN_TOOLS_TEMPLATE, None), (CHAT_TEMPLATE, None), (None, None),
    # The call markup without any tools rendering teaches nothing the server can use.
    ("{% for m in messages %}<tool_call>{{ m.content }}{% endfor %}", None),
])
def test_format_detected_from_template(template, expected):
    assert tool_call_format(template) is expected


@pytest.mark.parametrize("name, shows", [("qwen2.5", True), ("llama3.1", True), ("smollm3", True),
                                         ("plain tools", True), ("chatml, no tools", False)])
def test_renders_tools(tokenizers, name, shows):
    assert renders_tools(tokenizers[name]) is shows


def test_renders_tools_without_a_template(tmp_path):
    assert renders_tools(load_tokenizer(write_bpe_folder(tmp_path, chat_template=None))) is False


def test_renders_tools_ignores_a_template_that_only_reacts_to_tools(tmp_path):
    # Output changes with tools, but the model is never shown them.
    template = ("{% if tools %}Tools are on.{% endif %}"
                "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not renders_tools(load_tokenizer(write_bpe_folder(tmp_path, chat_template=template)))


@pytest.mark.parametrize("name", ["qwen2.5", "llama3.1", "smollm3", "plain tools"])
def test_tools_reach_the_prompt(tokenizers, name):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    text = tokenizers[name].apply_chat_template(messages, tokenize=False, tools=[WEATHER, TIME])
    def squeezed(s):  # the templates indent their JSON differently
        return "".join(s.split())

    for tool in (WEATHER, TIME):  # each tool whole, as JSON
        assert squeezed(json.dumps(tool)) in squeezed(text)
    assert "Weather in Paris?" in text
    ids = tokenizers[name].apply_chat_template(messages, tools=[WEATHER])
    assert tokenizers[name].decode(ids) == tokenizers[name].apply_chat_template(
        messages, tokenize=False, tools=[WEATHER])


# --- parsing Hermes-style replies ----------------------------------------------------------------

def test_hermes_one_call():
    content, call = only_call('<tool_call>\n{"name": "get_weather", "arguments": '
                              '{"city": "Paris", "unit": "celsius"}}\n</tool_call>', HERMES)
    assert content == ""
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == ARGUMENTS


def test_hermes_two_calls_with_text_around():
    text = ("Let me look both up.\n"
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
            "Done.")
    content, calls = parse_tool_calls(text, HERMES)
    assert content == "Let me look both up.\nDone."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {}]
    assert calls[0]["id"] != calls[1]["id"]


def test_hermes_arguments_as_json_text_kept_as_written():
    _, call = only_call('<tool_call>{"name": "get_weather", "arguments": '
                        '"{\\"city\\": \\"Paris\\"}"}</tool_call>', HERMES)
    assert call["function"]["arguments"] == '{"city": "Paris"}'


def test_hermes_non_ascii_arguments_stay_readable():
    _, call = only_call('<tool_call>{"name": "f", "arguments": {"city": "Zürich"}}</tool_call>',
                        HERMES)
    assert call["function"]["arguments"] == '{"city": "Zürich"}'


@pytest.mark.parametrize("reply", [
    # a } short
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}',  # never closed
    '<tool_call>\n["get_weather", {"city": "Paris"}]\n</tool_call>',
    '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "get_weather", "arguments": "Paris"}\n</tool_call>',  # text, not JSON
    '<tool_call>\n{"name": "get_weather", "arguments": [1, 2]}\n</tool_call>',
    "Sunny, 21 °C.",
])
def test_hermes_malformed_reply_is_content(reply):
    assert parse_tool_calls(reply, HERMES) == (reply, [])


def test_hermes_malformed_block_stays_beside_a_good_one():
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {oops}}\n</tool_call>'
    good = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    content, call = only_call(f"{bad}\n{good}", HERMES)
    assert content == bad and call["function"]["name"] == "get_time"
    # An opening tag that was never closed does not swallow the call after it.
    content, call = only_call(f"<tool_call> half a thought\n{good}", HERMES)
    assert content == "<tool_call> half a thought" and call["function"]["name"] == "get_time"


# --- parsing Llama-3-style replies ---------------------------------------------------------------

@pytest.mark.parametrize("reply", [
    '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
    '  {"type": "function", "name": "get_weather", "parameters": '
    '{"city": "Paris", "unit": "celsius"}}\n',
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    '{"name": "get_weather", "parameters": "{\\"city\\": \\"Paris\\", \\"unit\\": \\"celsius\\"}"}',
])
def test_llama_call(reply):
    content, call = only_call(reply, LLAMA3)
    assert content == "" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == ARGUMENTS


def test_llama_calls_separated_by_semicolons():
    content, calls = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "a;b"}}; '
                                      '{"name": "get_time", "parameters": {}}', LLAMA3)
    assert content == ""
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "a;b"}), ("get_time", {})]


@pytest.mark.parametrize("reply", [
    "It is sunny in Paris.",
    'Sure: {"name": "get_weather", "parameters": {"city": "Paris"}}',  # text first: an answer
    '{"name": "Ada", "age": 36}',  # an answer in JSON, not a call
    '{"name": "Ada"}',
    '{"name": "get_weather", "parameters": {"city": "Paris"}} and then some',
    '{"name": "get_weather", "parameters": {"city": "Paris"}',
    '{"name": "get_weather", "parameters": {}}; {"name": "Ada", "age": 36}',  # all or nothing
    "",
])
def test_llama_reply_that_is_no_call_is_content(reply):
    assert parse_tool_calls(reply, LLAMA3) == (reply, [])


def test_no_format_means_plain_content():
    reply = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert parse_tool_calls(reply, None) == (reply, [])


# --- request messages as templates read them -----------------------------------------------------

def assistant_call(arguments='{"city": "Paris", "unit": "celsius"}'):
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": arguments}}]}


def test_messages_for_template_converts_openai_messages():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather"},
                                     {"type": "text", "text": "in Paris?"}]},
        assistant_call(),
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "Sunny, 21 °C.", "tool_calls": None},
        {"role": "assistant", "content": "Anything else?", "tool_calls": []},
    ]
    before = json.dumps(messages)
    out = messages_for_template(messages)
    assert json.dumps(messages) == before  # the request is not changed
    assert out[0] == {"role": "user", "content": "Weather\nin Paris?"}
    assert out[1]["content"] == ""
    assert out[1]["tool_calls"] == [{"id": "call_1", "type": "function",
                                     "function": {"name": "get_weather", "arguments": ARGUMENTS}}]
    assert out[2] == messages[2]
    assert out[3] == {"role": "assistant", "content": "Sunny, 21 °C."}
    assert "tool_calls" not in out[4]


def test_messages_for_template_takes_arguments_already_a_mapping():
    out = messages_for_template([assistant_call(arguments=ARGUMENTS)])
    assert out[0]["tool_calls"][0]["function"]["arguments"] == ARGUMENTS


@pytest.mark.parametrize("messages, complaint", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0]: only text parts .* \\(got type 'image_url'\\)"),
    ([{"role": "user", "content": ["hi"]}], "messages[0].content[0]: only text parts"),
    ([{"role": "user", "content": 3}], "messages[0].content must be a string or an array"),
    ([{"role": "user", "content": "hi"}, assistant_call(arguments="{'city': 'Paris'}")],
     "messages[1].tool_calls[0].function.arguments is not JSON"),
    ([assistant_call(arguments='["Paris"]')],
     "messages[0].tool_calls[0].function.arguments must be"),
    ([{"role": "assistant", "tool_calls": [{"type": "function"}]}],
     "messages[0].tool_calls[0] must be"),
    ([{"role": "assistant", "tool_calls": {"id": "x"}}], "messages[0].tool_calls must be an array"),
    (["hello"], "messages[0] must be an object"),
    ({"role": "user"}, "messages must be an array"),
])
def test_messages_for_template_refuses_clearly(messages, complaint):
    with pytest.raises(ValueError, match=complaint.replace("[", r"\[")):
        messages_for_template(messages)


# --- round trip: model reply -> OpenAI response -> next request -> prompt ------------------------

@pytest.mark.parametrize("name, fmt", [("qwen2.5", HERMES), ("llama3.1", LLAMA3)])
def test_round_trip(tokenizers, name, fmt):
    tokenizer = tokenizers[name]
    assert tool_call_format(tokenizer.chat_template) is fmt
    prefix, suffix = forced_call_text(fmt, "get_weather")
    reply = prefix + json.dumps(ARGUMENTS) + suffix
    content, calls = parse_tool_calls(reply, fmt)
    assert content == "" and len(calls) == 1

    # The client sends the call back as OpenAI has it, with the tool's result.
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": calls[0]["id"], "content": "21 degrees"},
                {"role": "assistant", "content": "Sunny, 21 °C.", "tool_calls": None},
                {"role": "user", "content": "Thanks!"}]
    text = tokenizer.apply_chat_template(messages_for_template(messages), tokenize=False,
                                         tools=[WEATHER])
    # The past call reads exactly as the model writes one: arguments as an object, not as a
    # JSON string inside JSON; and that text parses back into the same call.
    assert reply in text and '"{\\"city' not in text
    start = text.index(reply)
    _, again = only_call(text[start:start + len(reply)], fmt)
    assert again["function"]["name"] == "get_weather"
    assert json.loads(again["function"]["arguments"]) == ARGUMENTS
    assert "21 degrees" in text and "Sunny, 21 °C." in text and text.index("Thanks!") > start


def test_smollm3_renders_a_tool_conversation(tokenizers):
    """SmolLM3's template shows no past tool_calls (only content); the conversation still renders
    and the tool's result reaches the prompt."""
    messages = [{"role": "user", "content": "Weather in Paris?"}, assistant_call(),
                {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}]
    text = tokenizers["smollm3"].apply_chat_template(messages_for_template(messages),
                                                     tokenize=False, tools=[WEATHER])
    assert "21 degrees" in text and text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n")


# --- forced calls --------------------------------------------------------------------------------

def test_forced_call_text():
    assert forced_call_text(HERMES, "get_weather") == (
        '<tool_call>\n{"name": "get_weather", "arguments": ', "}\n</tool_call>")
    assert forced_call_text(LLAMA3, "get_weather") == ('{"name": "get_weather", "parameters": ', "}")


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3])
def test_forced_call_parses_back(fmt):
    name = 'say "hi"'  # quoted into the JSON, not pasted in
    prefix, suffix = forced_call_text(fmt, name)
    _, call = only_call(prefix + '{"to": "Zoë"}' + suffix, fmt)
    assert call["function"]["name"] == name
    assert json.loads(call["function"]["arguments"]) == {"to": "Zoë"}
