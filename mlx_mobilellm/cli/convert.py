"""`mlx-mobilellm convert` (a checkpoint to an MLX model folder) and `mlx-mobilellm export` (back to
Hugging Face safetensors or GGUF); `python -m convert` runs the same commands."""

from __future__ import annotations

import argparse
import sys

from convert.convert import Q_BITS, Q_GROUP_SIZES
from convert.gguf_export import GGUF_TYPES

from ..errors import CheckpointError
from ..formats.sources import SOURCE_FORMATS
from .options import Option, add_options, dtype_option, output_options


CONVERT_OPTIONS = (
    Option("source", None, "source: a folder, a .safetensors or .gguf file, or a hub repo id",
           str, flags=("--hf-path", "--model"), required=True),
    Option("mlx_path", "mlx_model", "output MLX model folder", str),
    Option("source_format", None, "skip detection and read the source as this format", str,
           SOURCE_FORMATS),
    dtype_option("default: the source's dtype"),
    Option("quantize", False, "quantize every linear layer and the embedding",
           flags=("-q", "--quantize")),
    Option("q_bits", 4, "bits per quantized weight", int, Q_BITS),
    Option("q_group_size", 64, "weights sharing one scale and bias", int, Q_GROUP_SIZES),
    *output_options("--mlx-path"),
)


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, CONVERT_OPTIONS)


def run_convert(args: argparse.Namespace) -> None:
    from convert.convert import convert

    out = convert(args.source, args.mlx_path, source_format=args.source_format, dtype=args.dtype,
                  quantize=args.quantize, q_bits=args.q_bits, q_group_size=args.q_group_size,
                  force=args.force, quiet=args.quiet)
    if not args.quiet:
        print(f"wrote {out}", file=sys.stderr)


EXPORT_OPTIONS = (
    Option("model", None, "the MLX model folder to export", str, required=True),
    Option("format", None, "hf (default) or gguf; --gguf-path alone implies gguf", str,
           ("hf", "gguf")),
    Option("hf_path", None, "output Hugging Face folder", str),
    Option("gguf_path", None, "output .gguf file", str),
    Option("gguf_type", None, "GGUF tensor type (norms stay F32); default: the one --dtype "
           "names, else the folder's dtype", str, tuple(GGUF_TYPES)),
    Option("mlx_lm_path", None, "output folder for mlx-lm (mlx_lm.load)", str),
    Option("model_type", None, "Hugging Face format to write; default: the one it was converted "
           "from", str, ("llama4_text", "llama", "mobilellm")),
    dtype_option("default: the folder's dtype"),
    *output_options("output"),
)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, EXPORT_OPTIONS)


def run_export(args: argparse.Namespace) -> None:
    out = _export(args)
    if not args.quiet:
        print(f"wrote {out}", file=sys.stderr)


def _export(args: argparse.Namespace):
    """The one output asked for: --mlx-lm-path, --gguf-path (or --format gguf), or --hf-path."""
    if args.mlx_lm_path and (args.hf_path or args.gguf_path or args.format):
        raise CheckpointError("--mlx-lm-path is an output of its own; give it without "
                              "--hf-path, --gguf-path and --format")
    fmt = "mlx_lm" if args.mlx_lm_path else (
        args.format or ("gguf" if args.gguf_path and not args.hf_path else "hf"))
    if args.gguf_type and fmt != "gguf":
        raise CheckpointError("--gguf-type applies to --gguf-path; for other outputs use --dtype")
    options = dict(dtype=args.dtype, force=args.force, quiet=args.quiet)
    if fmt == "mlx_lm":
        from convert.mlx_lm_export import export_mlx_lm

        return export_mlx_lm(args.model, args.mlx_lm_path, model_type=args.model_type, **options)
    if fmt == "gguf":
        if not args.gguf_path:
            raise CheckpointError("--format gguf needs --gguf-path OUT.gguf")
        from convert.gguf_export import export_gguf

        return export_gguf(args.model, args.gguf_path, gguf_type=args.gguf_type, **options)
    if not args.hf_path:
        raise CheckpointError("export needs --hf-path OUT (or --gguf-path OUT.gguf for GGUF, "
                              "--mlx-lm-path OUT for mlx-lm)")
    from convert.export import export_hf

    return export_hf(args.model, args.hf_path, model_type=args.model_type, **options)
