"""The `mlx-mobilellm` command: one subcommand per user job.

The command line sits on top of both the library (mlx_mobilellm) and the converter (convert);
nothing else in mlx_mobilellm imports the converter (tests/test_layering.py checks)."""

from __future__ import annotations

import argparse
from typing import Optional

from .running import ArgumentParser, flag_namer, run_reporting_errors


def _commands() -> list:
    """(name, help, add_arguments, run, aliases): `aliases` maps the library parameters that the
    command's flags set under other names (export's mlx_path is its --model)."""
    from . import convert, evaluate, fuse, generate, lora, server, train

    return [
        ("generate", "stream text from a model", generate.add_generate_arguments,
         generate.run_generate, {}),
        ("chat", "a chat in the terminal that keeps its KV cache", generate.add_chat_arguments,
         generate.run_chat, {}),
        ("convert", "a checkpoint (HF, GGUF, ...) → an MLX model folder",
         convert.add_convert_arguments, convert.run_convert, {}),
        ("export", "an MLX model folder → Hugging Face safetensors or GGUF",
         convert.add_export_arguments, convert.run_export, {"mlx_path": "model"}),
        ("lora", "fine-tune LoRA / DoRA adapters (QLoRA on quantized models) on JSONL data",
         lora.add_lora_arguments, lora.run_lora, lora.PARAMETER_ALIASES),
        ("train", "pretrain a model from a preset (or a JSON config) on local text",
         train.add_train_arguments, train.run_train, train.PARAMETER_ALIASES),
        ("fuse", "merge adapters into the weights → an MLX model folder (and a Hugging Face one)",
         fuse.add_fuse_arguments, fuse.run_fuse, {}),
        ("server", "an OpenAI-compatible HTTP server (chat and text completions)",
         server.add_server_arguments, server.run_server, {}),
        ("evaluate", "perplexity on a text or JSONL file", evaluate.add_evaluate_arguments,
         evaluate.run_evaluate, {}),
    ]


def build_parser(prog: str = "mlx-mobilellm") -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog,
                            description="Run, convert and fine-tune MobileLLM models with MLX.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help, add_arguments, run, aliases in _commands():
        command = commands.add_parser(name, help=help)
        add_arguments(command)
        command.set_defaults(run=run, name_parameter=flag_namer(command, aliases))
    return parser


def main(argv: Optional[list] = None, prog: str = "mlx-mobilellm") -> int:
    args = build_parser(prog).parse_args(argv)
    return run_reporting_errors(args.run, args, args.name_parameter)
