"""`mlx-mobilellm convert` (a checkpoint to an MLX model folder) and `mlx-mobilellm export` (back to
Hugging Face safetensors or GGUF); `python -m convert` runs the same commands."""

from __future__ import annotations

import argparse
import sys

from convert.convert import Q_BITS, Q_GROUP_SIZES

from ..errors import CheckpointError
from ..formats.sources import SOURCE_FORMATS
from .options import add_dtype, add_output_switches


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-path", "--model", dest="source", required=True,
                        help="source: a folder, a .safetensors or .gguf file, or a hub repo id")
    parser.add_argument("--mlx-path", default="mlx_model", help="output MLX model folder")
    parser.add_argument("--source-format", choices=SOURCE_FORMATS,
                        help="skip detection and read the source as this format")
    add_dtype(parser, "default: the source's dtype")
    parser.add_argument("-q", "--quantize", action="store_true",
                        help="quantize every linear layer and the embedding")
    parser.add_argument("--q-bits", type=int, default=4, choices=Q_BITS)
    parser.add_argument("--q-group-size", type=int, default=64, choices=Q_GROUP_SIZES)
    add_output_switches(parser, "--mlx-path")


def run_convert(args: argparse.Namespace) -> None:
    from convert.convert import convert

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
    add_dtype(parser, "default: the folder's dtype")
    add_output_switches(parser, "the output")


def run_export(args: argparse.Namespace) -> None:
    fmt = args.format or ("gguf" if args.gguf_path and not args.hf_path else "hf")
    if fmt == "gguf":
        if not args.gguf_path:
            raise CheckpointError("--format gguf needs --gguf-path OUT.gguf")
        from convert.gguf_export import export_gguf

        out = export_gguf(args.model, args.gguf_path, force=args.force, quiet=args.quiet)
    else:
        if not args.hf_path:
            raise CheckpointError("export needs --hf-path OUT (or --gguf-path OUT.gguf for GGUF)")
        from convert.export import export_hf

        out = export_hf(args.model, args.hf_path, model_type=args.model_type, dtype=args.dtype,
                        force=args.force, quiet=args.quiet)
    if not args.quiet:
        print(f"wrote {out}", file=sys.stderr)
