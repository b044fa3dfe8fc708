"""`mlx-mobilellm server` against OpenAI's own client, on 127.0.0.1 on a free port: answers equal
what the library generates for the same prompt, streamed text equals whole text, logprobs are
the model's, JSON modes always parse, forced tool calls come back as tool_calls, sixteen
concurrent clients each get their single-request answer, a client that disconnects stops its
generation, and bad input gets OpenAI's error JSON with the right status while the server keeps
serving. The tiny model runs in this process (a uvicorn thread); the demo model and the
command line run as `mlx-mobilellm server` in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import jsonschema
import mlx.core as mx
import numpy as np
import openai
import pytest
import uvicorn

from convert.save import save_model
from generation_helpers import tiny_model, write_bpe_folder
from mlx_mobilellm import load, load_tokenizer, stream_generate
from mlx_mobilellm.server.app import create_app
from mlx_mobilellm.server.completions import Served
from mlx_mobilellm.server.protocol import Sampling
from mlx_mobilellm.server.worker import Finished, Job, Token, Worker

CONTEXT = 2048
# ChatML with tools shown in the system turn and Hermes-style <tool_call> blocks, as Qwen2.5's
# and Hermes' templates write them (trimmed).
TOOL_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|im_start|>system\nTools: <tools>"
    "{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>\n"
    "Call one as <tool_call>\n{\"name\": ..., \"arguments\": ...}\n</tool_call><|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{% for call in message.tool_calls %}<tool_call>\n"
    "{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}"
    "\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ message.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny random MLX model folder with a trained BPE tokenizer and a tools template."""
    root = tmp_path_factory.mktemp("server")
    vocab_size = load_tokenizer(write_bpe_folder(root / "tokenizer")).vocab_size
    model = tiny_model(vocab_size, seed=11, max_seq_len=CONTEXT)
    path = save_model(model, root / "model", "llama", quiet=True)
    return write_bpe_folder(path, chat_template=TOOL_TEMPLATE)


@pytest.fixture(scope="module")
def loaded(folder):
    return load(folder)


class LiveServer:
    """The app on a uvicorn thread; its worker's jobs, the events each was sent and the rows of
    every decoding step are recorded."""

    def __init__(self, loaded, **options):
        model, tokenizer = loaded
        self.worker = Worker(model, tokenizer, max_batch=16)
        self.jobs, self.events, self.batch_sizes = [], {}, []
        submit, hand_out = self.worker.submit, self.worker._hand_out

        def recording_submit(job):
            self.jobs.append(job)
            self.events[id(job)] = sent = []
            emit = job.emit
            job.emit = lambda event: (sent.append(event), emit(event))
            submit(job)

        def recording_hand_out(rows, step):
            self.batch_sizes.append(len(rows))
            hand_out(rows, step)

        self.worker.submit, self.worker._hand_out = recording_submit, recording_hand_out
        app = create_app(Served(model, tokenizer, "tiny", 64), self.worker, **options)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(loaded):
    with LiveServer(loaded) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def chat_prompt(tokenizer, messages, **variables) -> list:
    return tokenizer.apply_chat_template(messages, **variables)


def library_text(loaded, prompt, max_tokens, **options) -> tuple:
    """(text, finish_reason, tokens) the library generates for these ids."""
    model, tokenizer = loaded
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens, **options))
    return ("".join(r.text for r in responses), responses[-1].finish_reason,
            [r.token for r in responses])


def user(text: str) -> list:
    return [{"role": "user", "content": text}]


# --- answers ---------------------------------------------------------------------------------

def test_chat_answer_is_the_library_answer(client, loaded):
    messages = user("Hello world! The quick brown fox")
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20,
                                           temperature=0)
    prompt = chat_prompt(loaded[1], messages)
    text, reason, tokens = library_text(loaded, prompt, 20)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == reason
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(tokens)
    assert reply.usage.total_tokens == len(prompt) + len(tokens)
    assert reply.model == "tiny" and reply.object == "chat.completion"


def test_completion_answer_is_the_library_answer(client, loaded):
    reply = client.completions.create(model="tiny", prompt="def add(a, b):", max_tokens=15,
                                      temperature=0, stop=["\n\n"])
    ids = loaded[1].encode("def add(a, b):")
    text, reason, _ = library_text(loaded, ids, 15, stop=["\n\n"])
    assert reply.choices[0].text == text and reply.choices[0].finish_reason == reason
    tokens = client.completions.create(model="tiny", prompt=ids, max_tokens=15, temperature=0,
                                       stop=["\n\n"])
    assert tokens.choices[0].text == text


def test_sampling_with_a_seed_is_the_library_sampling(client, loaded):
    messages = user("tell me something")
    options = dict(temperature=0.9, top_p=0.9, seed=7)
    replies = [client.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                              **options).choices[0].message.content
               for _ in range(2)]
    text, _, _ = library_text(loaded, chat_prompt(loaded[1], messages), 16, temperature=0.9,
                              top_p=0.9, seed=7)
    assert replies == [text, text]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streamed_text_equals_the_whole_text(client, endpoint):
    if endpoint == "chat":
        create = client.chat.completions.create
        options = dict(messages=user("emoji 🦙🦙 and CJK 你好"))
        text_of = lambda chunk: chunk.choices[0].delta.content or ""  # noqa: E731
    else:
        create = client.completions.create
        options = dict(prompt="emoji 🦙🦙 and CJK 你好")
        text_of = lambda chunk: chunk.choices[0].text  # noqa: E731
    whole = create(model="tiny", max_tokens=30, temperature=0, **options)
    chunks = list(create(model="tiny", max_tokens=30, temperature=0, stream=True,
                         stream_options={"include_usage": True}, **options))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens
    streamed = "".join(text_of(c) for c in chunks[:-1])
    wanted = whole.choices[0].message.content if endpoint == "chat" else whole.choices[0].text
    assert streamed == wanted
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason


def test_sse_wire_format(server):
    body = {"model": "tiny", "messages": user("hi"), "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


# --- logprobs ----------------------------------------------------------------------------------

def test_chat_logprobs_are_the_models(client, loaded):
    model, tokenizer = loaded
    messages = user("digits 1234567")
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                           temperature=0, logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    prompt = chat_prompt(tokenizer, messages)
    _, _, tokens = library_text(loaded, prompt, 6)
    assert len(entries) == len(tokens) == reply.usage.completion_tokens
    for i, (entry, token) in enumerate(zip(entries, tokens)):
        logits = model(mx.array([prompt + tokens[:i]])).logits[0, -1].astype(mx.float32)
        expected = np.array(logits - mx.logsumexp(logits))
        assert entry.token == tokenizer.decode([token])
        assert entry.logprob == pytest.approx(float(expected[token]), abs=1e-4)
        top = [e.logprob for e in entry.top_logprobs]
        np.testing.assert_allclose(top, np.sort(expected)[::-1][:3], atol=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the most likely


def test_completion_logprobs_legacy_shape(client):
    reply = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0,
                                      logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert all(len(top) <= 2 and lp <= 0 for top, lp in zip(logprobs.top_logprobs,
                                                             logprobs.token_logprobs))
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)


# --- JSON modes and tool calls -----------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_output_always_parses_and_matches(client, seed):
    options = dict(model="tiny", messages=user("a person as JSON"), max_tokens=200,
                   temperature=1.0, seed=seed)
    reply = client.chat.completions.create(
        response_format={"type": "json_schema", "json_schema": {"name": "person",
                                                                "schema": SCHEMA}}, **options)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    with pytest.raises(json.JSONDecodeError):  # the random model alone writes no JSON
        json.loads(client.chat.completions.create(**options).choices[0].message.content)


def test_a_named_tool_choice_comes_back_as_a_tool_call(client):
    reply = client.chat.completions.create(
        model="tiny", messages=user("weather in Paris?"), tools=[WEATHER], max_tokens=1000,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # the call and its result go back in as the next turn's messages
    follow = client.chat.completions.create(model="tiny", max_tokens=5, temperature=0, messages=[
        *user("weather in Paris?"), choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21"}], tools=[WEATHER])
    assert follow.choices[0].message.content is not None


def test_tools_reach_the_prompt(client, loaded):
    plain = client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=1)
    with_tools = client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=1,
                                                tools=[WEATHER])
    expected = chat_prompt(loaded[1], user("hi"), tools=[WEATHER])
    assert with_tools.usage.prompt_tokens == len(expected) > plain.usage.prompt_tokens


# --- many clients ------------------------------------------------------------------------------

def test_sixteen_concurrent_clients_each_get_their_own_answer(server, client, loaded):
    prompts = [f"client {c} asks question {q}: what is {c * q}?" for c in range(16)
               for q in range(4)]
    expected = {p: library_text(loaded, chat_prompt(loaded[1], user(p)), 12)[0] for p in prompts}
    before = len(server.jobs)

    def ask(client_index: int) -> list:
        answers = []
        for q in range(4):
            prompt = prompts[client_index * 4 + q]
            reply = client.chat.completions.create(model="tiny", messages=user(prompt),
                                                   max_tokens=12, temperature=0)
            answers.append((prompt, reply.choices[0].message.content))
        return answers

    with ThreadPoolExecutor(16) as pool:
        answers = [a for batch in pool.map(ask, range(16)) for a in batch]
    assert len(answers) == 64
    assert {prompt: text for prompt, text in answers} == expected
    assert len(server.jobs) - before == 64
    assert max(server.batch_sizes) > 1  # requests decoded together, one model call per step


def test_a_client_that_disconnects_stops_its_generation(server):
    body = {"model": "tiny", "messages": user("go on forever"), "max_tokens": 400,
            "stream": True, "temperature": 0, "stop": []}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    job = server.jobs[-1]
    assert job.cancelled.wait(10)
    # the worker is free again: the next request is answered, and the first got no more tokens
    reply = httpx.post(server.url + "/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert reply.status_code == 200
    sent = server.events[id(job)]
    assert 3 <= len(sent) < 400 and all(isinstance(event, Token) for event in sent)


# --- bad input ---------------------------------------------------------------------------------

BAD = {
    "not-json": (b"{not json", 400, None),
    "not-an-object": (b"[1, 2]", 400, None),
    "max-tokens-kind": ({"messages": user("hi"), "max_tokens": "ten"}, 422, "max_tokens"),
    "max-tokens-zero": ({"messages": user("hi"), "max_tokens": 0}, 422, "max_tokens"),
    "max-tokens-beyond-context": ({"messages": user("hi"), "max_tokens": CONTEXT}, 400, "max_tokens"),
    "prompt-beyond-context": ({"messages": user("word " * 4000)}, 400, "messages"),
    "temperature-range": ({"messages": user("hi"), "temperature": 3}, 422, "temperature"),
    "messages-missing": ({"model": "tiny"}, 422, "messages"),
    "messages-kind": ({"messages": "hi"}, 422, "messages"),
    "role": ({"messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages[0].role"),
    "stream-kind": ({"messages": user("hi"), "stream": "yes"}, 422, "stream"),
    "n-two": ({"messages": user("hi"), "n": 2}, 400, "n"),
    "schema-unsupported": ({"messages": user("hi"), "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "a+"}}}},
        400, "response_format.json_schema.schema"),
    "stop-too-long": ({"messages": user("hi"), "stop": ["a" * 100_000]}, 422, "stop"),
    "lone-surrogate": (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 422, "messages"),
    "schema-too-deep": ({"messages": user("hi"), "response_format": {
        "type": "json_schema", "json_schema": {"schema": json.loads(
            '{"type": "array", "items": ' * 600 + '{}' + '}' * 600)}}},
        400, "response_format.json_schema.schema"),
    "tool-not-an-object": ({"messages": user("hi"), "tools": ["get_weather"]}, 422, "tools"),
    "tool-without-a-name": ({"messages": user("hi"), "tools": [{"type": "function", "function": {}}]},
                            422, "tools"),
    "tool-choice-unknown": ({"messages": user("hi"), "tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, 422, "tool_choice"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_an_openai_error_and_the_server_keeps_serving(server, name):
    body, status, param = BAD[name]
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body}
    response = httpx.post(server.url + "/v1/chat/completions", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and "\n" not in error["message"] and error["type"]
    assert error["param"] == param
    assert httpx.get(server.url + "/health").status_code == 200


def test_completion_errors_name_the_prompt(server):
    for body, status in ((b'{"prompt": "' + b"word " * 4000 + b'"}', 400),
                         (b'{"prompt": "\\ud800"}', 422), (b'{"prompt": [1, 1000000000]}', 422)):
        response = httpx.post(server.url + "/v1/completions", content=body, timeout=30,
                              headers={"content-type": "application/json"})
        assert response.status_code == status and response.json()["error"]["param"] == "prompt"


def test_a_request_that_cannot_join_is_not_starved(loaded):
    """Queued in this order: two batchable jobs, a seeded one, two more batchable ones. The
    first two decode together; the seeded one runs next, before the last two, which do not
    join the batch while it waits."""
    model, tokenizer = loaded
    worker, order = Worker(model, tokenizer), []
    sampling = dict(max_tokens=None, top_p=1.0, top_k=0, min_p=0.0, stop=[],
                    repetition_penalty=None, repetition_context_size=20, logprobs=None,
                    stream=False, include_usage=False)
    names = ["first", "second", "seeded", "later", "last"]
    for name in names:
        worker.submit(Job(prompt=tokenizer.encode(f"{name} go"), max_tokens=6,
                          sampling=Sampling(temperature=0.5 if name == "seeded" else 0.0,
                                            seed=3 if name == "seeded" else None, **sampling),
                          emit=lambda event, name=name: order.append((name, event))))
    worker.start()
    worker.stop()
    finished = [name for name, event in order if isinstance(event, Finished)]
    assert sorted(finished) == sorted(names)
    first_token = {name: next(i for i, (n, _) in enumerate(order) if n == name) for name in names}
    seeded_done = next(i for i, (n, e) in enumerate(order) if n == "seeded" and isinstance(e, Finished))
    assert first_token["second"] < first_token["seeded"]  # second joined first's batch
    assert seeded_done < first_token["later"] and seeded_done < first_token["last"]


def test_fields_the_server_does_not_know_are_ignored(client):
    reply = client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2,
                                           user="someone", extra_body={"mirostat": 2})
    assert reply.choices[0].message.content is not None


def test_a_body_over_the_limit_is_413(loaded):
    with LiveServer(loaded, max_body_bytes=1000) as live:
        response = httpx.post(live.url + "/v1/completions",
                              json={"prompt": "x" * 2000, "max_tokens": 1})
        assert response.status_code == 413 and "limit" in response.json()["error"]["message"]
        assert httpx.post(live.url + "/v1/completions",
                          json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_the_api_key_is_required_when_set(loaded):
    with LiveServer(loaded, api_key="sesame") as live:
        wrong = openai.OpenAI(base_url=live.url + "/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=live.url + "/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in right.models.list()] == ["tiny"]
        assert httpx.get(live.url + "/health").status_code == 200  # no key for health checks


def test_unknown_routes_and_methods(server):
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405
    assert httpx.get(server.url + "/v1/nothing").json()["error"]["message"]


# --- the command, with the demo model ------------------------------------------------------------

@contextmanager
def command_server(*flags):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "mlx_mobilellm.cli", "server", "--port",
                                str(port), *flags], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the server did not answer /health"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_the_demo_model_answers_through_the_command():
    with command_server() as (url, process):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", temperature=0, max_tokens=12,
            messages=user("What is the capital of France?"))
        assert "Paris" in reply.choices[0].message.content
        assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct"]
        # any JSON object: a real model closes what it opens, and the answer parses
        reply = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", temperature=0, max_tokens=60,
            response_format={"type": "json_object"},
            messages=user('What is the capital of France? Answer in JSON with one key, "capital".'))
        assert reply.choices[0].finish_reason == "stop"
        assert json.loads(reply.choices[0].message.content) == {"capital": "Paris"}


def test_binding_beyond_this_machine_without_a_key_warns(folder):
    with command_server("--model", str(folder), "--host", "0.0.0.0") as (url, process):
        pass
    assert "--api-key" in process.stderr.read()
