"""`mlx-mobilellm server`: serve a model over the OpenAI API (see mlx_mobilellm/server)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CheckpointError
from .generate import MODEL_OPTIONS, load_models, one_process_only
from .options import Option, add_options

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SERVER_OPTIONS = (
    Option("host", "127.0.0.1", "the address to listen on; another than this machine's own "
           "(0.0.0.0) lets other machines in: set --api-key", str),
    Option("port", 8080, "the port to listen on", int),
    Option("api_key", None, "require 'Authorization: Bearer KEY' on every /v1 request", str),
    Option("max_tokens", 512, "max_tokens of a request that sets none", int,
           flags=("--max-tokens", "-m")),
    Option("max_batch", 16, "requests decoded together at most", int),
    Option("prompt_caches", 4, "KV caches kept between requests (conversations whose next turn "
           "reuses its prefix)", int),
    Option("model_id", None, "the model name /v1/models lists and responses carry (default: "
           "--model's folder name)", str),
    Option("log_level", "warning", "uvicorn's log level", str,
           choices=("critical", "error", "warning", "info", "debug")),
)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, MODEL_OPTIONS + SERVER_OPTIONS)


def _check_values(args) -> None:
    for name, value, least in (("--max-tokens", args.max_tokens, 1),
                               ("--max-batch", args.max_batch, 1),
                               ("--prompt-caches", args.prompt_caches, 1)):
        if value < least:
            raise CheckpointError(f"{name} must be at least {least}, got {value}")
    if not 0 <= args.port < 65536:
        raise CheckpointError(f"--port must be in [0, 65535], got {args.port}")
    if args.host not in LOCAL_HOSTS and args.api_key is None:
        print(f"warning: --host {args.host} lets other machines use this server, and there is "
              "no --api-key", file=sys.stderr)


def run_server(args) -> None:
    import uvicorn

    from ..server.app import create_app
    from ..server.completions import Served
    from ..server.worker import Worker

    _check_values(args)
    one_process_only("server")
    model, tokenizer, draft = load_models(args)
    model_id = args.model_id or (Path(args.model).name if args.model else "SmolLM2-135M-Instruct")
    served = Served(model, tokenizer, model_id, args.max_tokens)
    worker = Worker(model, tokenizer, max_batch=args.max_batch, prompt_caches=args.prompt_caches,
                    draft_model=draft, num_draft_tokens=args.num_draft_tokens)
    print(f"serving {model_id} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(create_app(served, worker, args.api_key), host=args.host, port=args.port,
                log_level=args.log_level)
