"""Chat templates come with the checkpoint: a hostile or careless one must end in one
ChatTemplateError line within seconds, never a hang, a memory blow-up or a traceback; real
templates must render exactly as before, from any thread.

Hostile templates run in a child process with a timeout and an address-space cap, so that on a
renderer without limits they fail the test instead of hanging it or exhausting the machine."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from generation_helpers import CHAT_TEMPLATE, write_bpe_folder
from mlx_mobilellm import load_tokenizer
from mlx_mobilellm.chat_template import ChatTemplateError, render_chat_template

HANG_SECONDS = 60
"""A child that has not answered by then hangs (a refusal takes well under a second)."""
TIME_LIMIT = "took more than 1 seconds to render"

LIMIT_MESSAGE = ("the model's chat template makes more than 1,000,000 characters (in one value "
                 "or in its output); fix the template, or use --ignore-chat-template")

# Each template asks for far more time or memory than a render may take; what it should be
# refused for follows it.
HOSTILE = {
    "nested range": ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}"
                     "{% endfor %}", "more than 1,000,000 numbers with range()"),
    "range past sys.maxsize": ("{{ range(10**20)|list }}", "numbers with range()"),
    "lipsum": ("{{ lipsum(10**6) }}", "'lipsum' is undefined"),
    "string product": ("{{ 'a' * 10**10 }}", "more than 1,000,000 characters"),
    "list product": ("{{ ['a'] * 10**10 }}", "more than 1,000,000 characters"),
    "ljust": ("{{ 'x'.ljust(10**9) }}", "more than 1,000,000 characters"),
    "zfill": ("{{ '1'.zfill(10**10) }}", "more than 1,000,000 characters"),
    "bytes rjust": ("{{ 'x'.encode().rjust(10**10) }}", "more than 1,000,000 characters"),
    "center filter": ("{{ 'x'|center(10**9) }}", "more than 1,000,000 characters"),
    "expandtabs": ("{{ ('\t' * 1000).expandtabs(10**7) }}", "more than 1,000,000 characters"),
    "replace doubling in a loop": (
        "{% set ns = namespace(s='a') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s.replace('a', 'aa') %}{% endfor %}", "more than 1,000,000 characters"),
    "replace filter, one step": ("{{ ('a' * 100000)|replace('a', 'b' * 100000) }}",
                                 "more than 1,000,000 characters"),
    "join": ("{{ ('x' * 100000).join(['a'] * 10000) }}", "more than 1,000,000 characters"),
    "translate": ("{{ ('a' * 100000).translate({97: 'b' * 100000}) }}",
                  "more than 1,000,000 characters"),
    "printf width": ("{{ '%1000000000d' % 1 }}", "more than 1,000,000 characters"),
    "printf star width": ("{{ '%*d' % (10**9, 1) }}", "more than 1,000,000 characters"),
    "format filter": ("{{ '%1000000000d'|format(1) }}", "more than 1,000,000 characters"),
    "str.format width": ("{{ '{:>{}}'.format('x', 10**9) }}", "more than 1,000,000 characters"),
    "str.format many fields": ("{% set ns = namespace(a='z' * 900000) %}"
                               "{{ ('{0.a}' * 1000).format(ns) }}", "characters in all"),
    "indent": ("{{ ('\n' * 100000)|indent(100000) }}", "more than 1,000,000 characters"),
    "batch filled": ("{{ [1]|batch(10**10, 'x')|list }}", "more than 1,000,000 characters"),
    "tojson indent of a deep value": (
        "{% set ns = namespace(l=[]) %}{% for i in range(500) %}{% set ns.l = [ns.l] %}"
        "{% endfor %}{{ ns.l|tojson(indent=100000) }}", "more than 1,000,000 characters"),
    "int.to_bytes": ("{{ (1).to_bytes(10**10, 'big') }}", "more than 1,000,000 characters"),
    "big power": ("{{ 2 ** 100000000 }}", "a number of more than 65,536 bits"),
    "squaring in a loop": ("{% set ns = namespace(n=3) %}{% for i in range(100) %}"
                           "{% set ns.n = ns.n * ns.n %}{% endfor %}", "bits"),
    "~ doubling": ("{% set ns = namespace(s='a') %}{% for i in range(64) %}"
                   "{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "more than 1,000,000 characters"),
    "+ doubling": ("{% set ns = namespace(s='a') %}{% for i in range(64) %}"
                   "{% set ns.s = ns.s + ns.s %}{% endfor %}", "more than 1,000,000 characters"),
    # A list holding the previous one twice: tiny in memory, a terabyte as text.
    "shared list printed": ("{% set ns = namespace(l=[1]) %}{% for i in range(64) %}"
                            "{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}",
                            "more than 1,000,000 characters"),
    # Comparing two such tuples recurses 2**200 times in C.
    "shared tuples compared": (
        "{% set ns = namespace(a=(1,), b=(1,)) %}{% for i in range(200) %}"
        "{% set ns.a = (ns.a, ns.a) %}{% set ns.b = (ns.b, ns.b) %}{% endfor %}{{ ns.a == ns.b }}",
        "more than 1,000,000 characters"),
    "shared dict()": ("{% set ns = namespace(d={}) %}{% for i in range(64) %}"
                      "{% set ns.d = dict(a=ns.d, b=ns.d) %}{% endfor %}{{ ns.d }}",
                      "more than 1,000,000 characters"),
    "shared rows from batch": (
        "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}"
        "{% for row in [ns.l]|batch(2, ns.l) %}{% set ns.l = row %}{% endfor %}{% endfor %}",
        "more than 1,000,000 characters"),
    "summing lists": ("{{ (range(100000)|map('string')|map('list')|list)|sum(start=[]) }}",
                      "more than 1,000,000 characters"),
    "many padded results kept": ("{{ range(100000)|map('center', 900000)|list|length }}",
                                 "characters in all"),
    "block buffer": ("{% set s = 'y' * 900000 %}{% set b %}{% for i in range(10000) %}{{ s }}"
                     "{% endfor %}{% endset %}{{ b|length }}", "more than 1,000,000 characters"),
    "output flood": ("{% for i in range(100000) %}{{ 'y' * 900000 }}{% endfor %}",
                     "more than 1,000,000 characters"),
    "recursive macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
                        "recursed too deeply"),
    "deeply nested template": ("{% if 1 %}" * 5000 + "{% endif %}" * 5000, "recursed too deeply"),
    "nested loops over a list": (
        "{% set l = range(3000)|list %}{% for a in l %}{% for b in l %}{% for c in l %}"
        "{% endfor %}{% endfor %}{% endfor %}", TIME_LIMIT),
}

CHILD = """
import json, resource, sys, threading, time
from mlx_mobilellm import chat_template
request = json.loads(sys.stdin.read())
chat_template.RENDER_SECONDS = request["seconds"]  # the time limit is tested here, not its default
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
try:
    text = chat_template.render_chat_template(request["template"], request["messages"])
    reply = {"outcome": "rendered", "length": len(text)}
except chat_template.ChatTemplateError as error:
    reply = {"outcome": "error", "message": str(error)}
for _ in range(100):  # a render stopped for time ends within moments
    if not any(t.name == "chat-template" for t in threading.enumerate()):
        break
    time.sleep(0.05)
reply["workers_left"] = sum(t.name == "chat-template" for t in threading.enumerate())
print(json.dumps(reply))
"""


def render_in_child(template: str, messages=({"role": "user", "content": "hi"},),
                    seconds: float = 1.0) -> dict:
    try:
        done = subprocess.run([sys.executable, "-c", CHILD], cwd=Path(__file__).parents[1],
                              input=json.dumps({"template": template, "messages": list(messages),
                                                "seconds": seconds}),
                              capture_output=True, text=True, timeout=HANG_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the render hung (no answer in {HANG_SECONDS} s)")
    assert done.returncode == 0 and not done.stderr, f"exit {done.returncode}: {done.stderr}"
    return json.loads(done.stdout)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_template_is_refused_in_one_line(name):
    template, reason = HOSTILE[name]
    # A limit other than time is given time enough to be reached first on a loaded machine.
    reply = render_in_child(template, seconds=1.0 if reason == TIME_LIMIT else HANG_SECONDS / 3)
    assert reply["outcome"] == "error", reply
    message = reply["message"]
    assert reason in message and "\n" not in message, message
    assert reply["workers_left"] == 0


def test_limit_message_names_the_limit_and_the_way_out():
    with pytest.raises(ChatTemplateError) as error:
        render_chat_template("{{ 'a' * 10**7 }}", [])
    assert str(error.value) == LIMIT_MESSAGE


def test_output_limit_scales_with_the_conversation():
    # 3x a 1 MB message is a long answer, not an attack; 5x passes OUTPUT_PER_INPUT_CHAR.
    messages = [{"role": "user", "content": "x" * 1_000_000}]
    three = "{% for i in range(3) %}{{ messages[0].content }}{% endfor %}"
    assert len(render_chat_template(three, messages)) == 3_000_000
    with pytest.raises(ChatTemplateError, match="more than 4,000"):
        render_chat_template(three.replace("3", "5"), messages)


@pytest.mark.parametrize("template, error", [
    ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
    ("{{ 'a' + 1 }}", "TypeError: can only concatenate str"),
    ("{{ '{a}'.format() }}", "KeyError: 'a'"),
    ("{{ 10.0 ** 1000 }}", "OverflowError"),
])
def test_python_errors_of_the_template_are_one_line(template, error):
    with pytest.raises(ChatTemplateError, match=f"the chat template failed to render: {error}"):
        render_chat_template(template, [])


def test_memory_error_inside_a_render_is_a_chat_template_error():
    def exhausted():
        raise MemoryError

    with pytest.raises(ChatTemplateError, match="ran out of memory; fix the template"):
        render_chat_template("{{ exhausted() }}", [], exhausted=exhausted)


# --- real templates: unchanged ---------------------------------------------------------------

def plain_render(source: str, messages: list, **variables) -> str:
    """The renderer before limits: jinja2's sandbox with transformers' settings."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent,
                                                                  ensure_ascii=False)
    return env.from_string(source).render(messages=messages, add_generation_prompt=True,
                                          **variables)


# A tool-calling template in the style of Llama 3.x and Qwen 2.5: tojson with an indent, loop
# variables, namespace, slicing, string concatenation and filters.
TOOLS_TEMPLATE = (
    "{{- bos_token }}{%- set ns = namespace(system='') %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set ns.system = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- endif %}"
    "{{- '<|im_start|>system\\n' + ns.system }}"
    "{%- if tools %}{%- for t in tools %}{{- '\\n' + t|tojson(indent=4) }}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- for message in messages %}"
    "{%- if message.tool_calls %}{%- for call in message.tool_calls %}"
    "{{- '<tool_call>' + {'name': call.name, 'arguments': call.arguments}|tojson"
    " + '</tool_call>' }}"
    "{%- endfor %}{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content']|replace('\\r', '')"
    " + '<|im_end|>' }}"
    "{%- endif %}{%- if not loop.last %}{{- '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TOOLS = [{"name": "weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["Paris", "Zürich"]}, "days": {"type": "integer"}}}}]


def conversation(turns: int) -> list:
    messages = [{"role": "system", "content": "  Be brief. 🦙  "}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"question {i}\r\n" * 20},
                     {"role": "assistant", "content": "", "tool_calls": [
                         {"name": "weather", "arguments": {"city": "Zürich", "days": i}}]},
                     {"role": "assistant", "content": f"answer {i} " * 50}]
    return messages


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    """The chat template of the real SmolLM2 GGUF (the demo model)."""
    from mlx_mobilellm.formats.gguf_file import read_metadata
    from mlx_mobilellm.demo import demo_model_path

    return read_metadata(demo_model_path())[0]["tokenizer.chat_template"]


@pytest.mark.parametrize("turns", [1, 30, 1000])
def test_real_templates_render_as_before(smollm2_template, turns):
    messages = conversation(turns)
    plain = [m for m in messages if "tool_calls" not in m]
    for template, chat, variables in [(smollm2_template, plain, {}),
                                      (CHAT_TEMPLATE, plain, {"bos_token": "<s>"}),
                                      (TOOLS_TEMPLATE, messages,
                                       {"bos_token": "<s>", "tools": TOOLS})]:
        assert (render_chat_template(template, chat, **variables)
                == plain_render(template, chat, **variables))


def test_renders_from_other_threads(smollm2_template):
    messages = conversation(5)[:2]
    want = plain_render(smollm2_template, messages)
    results = []

    def render():
        results.append(render_chat_template(smollm2_template, messages))

    threads = [threading.Thread(target=render) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_SECONDS)
    assert results == [want] * 8


def test_refusal_through_a_model_folder(tmp_path):
    tokenizer = load_tokenizer(write_bpe_folder(tmp_path, chat_template="{{ 'a' * 10**7 }}"))
    with pytest.raises(ChatTemplateError, match="chat template makes more than"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("template", [
    "{{ ('a b c ' * 30)|wordwrap(10, break_on_hyphens=False) }}",
    "{{ ('a-b c ' * 30)|wordwrap(7, True, '|') }}",
    "{{ ('x\ny\n' * 3)|indent(2, first=True) }}",
    "{{ ('x\n<y>\n'|e)|indent('> ', blank=True) }}",
    "{{ 'a%sb'|format(3) }} {{ '%(a)s-%(a)s' % {'a': 1} }} {{ '%5.1f' % 2.25 }}",
    "{{ [1, 2, 3]|join(', ') }} {{ ['a', 'b']|join }} {{ users|join(', ', attribute='n') }}",
    "{{ 'x'|center(9) }}|{{ 'abcabc'|replace('b', 'XY', 1) }}",
    "{{ [[1], [2]]|sum(start=[]) }} {{ [1, 2, 3]|sum }} {{ range(5)|batch(2, 0)|list }}",
    "{{ '{} {:>5}'.format(1, 'a') }} {{ '{a}'.format_map({'a': 3}) }} {{ ('x'|safe).format() }}",
    "{% for a, b in [(1, 2)] %}{{ a + b }}{% endfor %}{{ {'k': (1, [2])} }}",
    "{{ 'a\tb'.expandtabs(4) }} {{ 'x'.zfill(5) }} {{ '-'.join(['a', 'b']) }}",
    "{{ (258).to_bytes(2, 'big') }} {{ 'ab'.translate({97: 'zz'}) }} {{ users|tojson }}",
    "{{ 2 ** 10 }} {{ 2 * 3 }} {{ 'ab' * 2 }} {{ 7 % 3 }} {{ 'a' ~ 1 ~ [2] }}",
])
def test_bounded_operations_give_jinjas_results(template):
    users = [{"n": "u1"}, {"n": "u2"}]
    env = ImmutableSandboxedEnvironment()
    env.filters["tojson"] = lambda value: json.dumps(value)
    assert render_chat_template(template, [], users=users) == env.from_string(template).render(
        messages=[], add_generation_prompt=True, users=users)
