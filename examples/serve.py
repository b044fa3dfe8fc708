"""Serve the demo model over the OpenAI API and talk to it with OpenAI's own client: a chat, a
streamed answer, and an answer held to a JSON schema.

    pip install openai && python examples/serve.py

The server is `mlx-mobilellm server`, started here on a free port and stopped at the end; any
app that speaks the OpenAI API can use it the same way (base_url http://127.0.0.1:PORT/v1).
"""

import json
import socket
import subprocess
import sys
import time
import urllib.request

from openai import OpenAI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, server: subprocess.Popen) -> None:
    while True:
        if server.poll() is not None:
            sys.exit("the server stopped before it was ready")
        try:
            urllib.request.urlopen(url + "/health")
            return
        except OSError:
            time.sleep(0.3)


port = free_port()
server = subprocess.Popen([sys.executable, "-m", "mlx_mobilellm.cli", "server", "--port", str(port)])
try:
    wait_until_ready(f"http://127.0.0.1:{port}", server)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-needed")
    model = client.models.list().data[0].id

    reply = client.chat.completions.create(
        model=model, temperature=0, max_tokens=30,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    print("chat:", reply.choices[0].message.content)

    print("stream: ", end="")
    for chunk in client.chat.completions.create(
            model=model, temperature=0, max_tokens=40, stream=True,
            messages=[{"role": "user", "content": "Name three colours."}]):
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()

    city = {"type": "object", "required": ["city", "country"], "additionalProperties": False,
            "properties": {"city": {"type": "string", "maxLength": 30},
                           "country": {"type": "string", "maxLength": 30}}}
    reply = client.chat.completions.create(
        model=model, temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "Which city is the Eiffel Tower in? Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": city}})
    print("json:", json.loads(reply.choices[0].message.content))
finally:
    server.terminate()
    server.wait()
