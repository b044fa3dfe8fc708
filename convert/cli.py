"""Command lines for convert and export; `mlx-mobilellm convert|export` and `python -m convert`
run these same functions. Flags follow mlx-lm's where the idea is the same."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from mlx_mobilellm.errors import CheckpointError

from .convert import Q_BITS, Q_GROUP_SIZES, convert
from .sources import SOURCE_FORMATS

DTYPE_CHOICES = ("float32", "float16", "bfloat16")


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-path", "--model", dest="source", required=True,
                        help="source: a folder, a .safetensors or .gguf file, or a hub repo id")
    parser.add_argument("--mlx-path", default="mlx_model", help="output MLX model folder")
    parser.add_argument("--source-format", choices=SOURCE_FORMATS,
                        help="skip detection and read the source as this format")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: the source's dtype")
    parser.add_argument("-q", "--quantize", action="store_true",
                        help="quantize every linear layer and the embedding")
    parser.add_argument("--q-bits", type=int, default=4, choices=Q_BITS)
    parser.add_argument("--q-group-size", type=int, default=64, choices=Q_GROUP_SIZES)
    parser.add_argument("--force", action="store_true", help="replace an existing --mlx-path")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_convert(args: argparse.Namespace) -> None:
    out = convert(args.source, args.mlx_path, source_format=args.source_format, dtype=args.dtype,
                  quantize=args.quantize, q_bits=args.q_bits, q_group_size=args.q_group_size,
                  force=args.force, quiet=args.quiet)
    if not args.quiet:
        print(f"wrote {out}", file=sys.stderr)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the MLX model folder to export")
    parser.add_argument("--format", choices=("hf", "gguf"),
                        help="hf (default) or gguf; --gguf-path alone implies gguf")
    parser.add_argument("--hf-path", help="output Hugging Face folder")
    parser.add_argument("--gguf-path", help="output .gguf file")
    parser.add_argument("--model-type", choices=("llama4_text", "llama", "mobilellm"),
                        help="Hugging Face format to write; default: the one it was converted from")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: the folder's dtype")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_export(args: argparse.Namespace) -> None:
    fmt = args.format or ("gguf" if args.gguf_path and not args.hf_path else "hf")
    if fmt == "gguf":
        if not args.gguf_path:
            raise CheckpointError("--format gguf needs --gguf-path OUT.gguf")
        from .gguf_export import export_gguf

        out = export_gguf(args.model, args.gguf_path, force=args.force, quiet=args.quiet)
    else:
        if not args.hf_path:
            raise CheckpointError("export needs --hf-path OUT (or --gguf-path OUT.gguf for GGUF)")
        from .export import export_hf

        out = export_hf(args.model, args.hf_path, model_type=args.model_type, dtype=args.dtype,
                        force=args.force, quiet=args.quiet)
    if not args.quiet:
        print(f"wrote {out}", file=sys.stderr)


class ArgumentParser(argparse.ArgumentParser):
    """A usage error is bad input like any other: one `error:` line and exit status 1 (argparse
    prints the usage block and exits with 2)."""

    def error(self, message: str):
        self.exit(1, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def one_line(error: BaseException) -> str:
    """The message of an error as a single line (messages from libraries may span several)."""
    if isinstance(error, OSError) and error.strerror:
        # The disk, permissions or a vanished file: the environment's failure, said as the OS says it.
        names = [str(n) for n in (error.filename, error.filename2) if n is not None]
        return ": ".join([*names, error.strerror]) if names else error.strerror
    return " ".join(str(error).split())


def _fill_closed_stdin() -> None:
    """With standard input closed, the next file opened gets descriptor 0, and MLX's loaders
    take a file on descriptor 0 for one that failed to open ("truncated or corrupt"). Keep
    descriptor 0 taken by /dev/null; sys.stdin stays None, so commands reading it still see
    it closed."""
    try:
        os.fstat(0)
    except OSError:
        os.open(os.devnull, os.O_RDONLY)


def run_reporting_errors(run, args: argparse.Namespace) -> int:
    """Run a command; bad input (and a failing disk) becomes one line on stderr and exit status 1."""
    _fill_closed_stdin()
    try:
        run(args)
    except (CheckpointError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: Optional[list] = None) -> int:
    """`python -m convert [convert] ARGS` converts; `python -m convert export ARGS` exports."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("convert", "export") else "convert"
    parser = ArgumentParser(prog=f"python -m convert {command}")
    if command == "export":
        add_export_arguments(parser)
        return run_reporting_errors(run_export, parser.parse_args(argv))
    add_convert_arguments(parser)
    return run_reporting_errors(run_convert, parser.parse_args(argv))
