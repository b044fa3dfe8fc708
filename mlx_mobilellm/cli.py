"""The `mlx-mobilellm` command: one subcommand per user job."""

from __future__ import annotations

import argparse
import sys
from typing import Optional


def build_parser() -> argparse.ArgumentParser:
    from convert.cli import (ArgumentParser, add_convert_arguments, add_export_arguments,
                             run_convert, run_export)

    from .cli_generate import add_chat_arguments, add_generate_arguments, run_chat, run_generate
    from .cli_lora import add_fuse_arguments, add_lora_arguments, run_fuse, run_lora

    parser = ArgumentParser(prog="mlx-mobilellm",
                                     description="Run, convert and fine-tune MobileLLM models with MLX.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="stream text from a model")
    add_generate_arguments(generate)
    generate.set_defaults(run=run_generate)
    chat = commands.add_parser("chat", help="a chat in the terminal that keeps its KV cache")
    add_chat_arguments(chat)
    chat.set_defaults(run=run_chat)
    convert = commands.add_parser("convert", help="a checkpoint (HF, GGUF, ...) → an MLX model folder")
    add_convert_arguments(convert)
    convert.set_defaults(run=run_convert)
    export = commands.add_parser("export", help="an MLX model folder → Hugging Face safetensors or GGUF")
    add_export_arguments(export)
    export.set_defaults(run=run_export)
    lora = commands.add_parser("lora", help="fine-tune LoRA / DoRA adapters (QLoRA on quantized "
                               "models) on JSONL data")
    add_lora_arguments(lora)
    lora.set_defaults(run=run_lora)
    fuse = commands.add_parser("fuse", help="merge adapters into the weights → an MLX model folder "
                               "(and a Hugging Face one)")
    add_fuse_arguments(fuse)
    fuse.set_defaults(run=run_fuse)
    return parser


def main(argv: Optional[list] = None) -> int:
    from convert.cli import run_reporting_errors

    args = build_parser().parse_args(argv)
    return run_reporting_errors(args.run, args)


if __name__ == "__main__":
    sys.exit(main())
