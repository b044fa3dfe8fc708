"""`mlx-mobilellm fuse`: merge fine-tuned adapters into the weights, write an MLX model folder
(and, with --export-hf, a Hugging Face one)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError
from .lora import model_spec, parameter_names
from .options import Option, add_options, output_options


FUSE_OPTIONS = (
    Option("model", None, "base model (default: the one adapter_config.json names, else the demo "
           "model)", str),
    Option("adapter_path", "adapters", "folder of adapters.safetensors and adapter_config.json",
           str),
    Option("save_path", "fused_model", "output MLX model folder", str),
    Option("export_hf", None, "also export the fused model as a Hugging Face folder (the format "
           "the base model came from)", str),
    Option("dequantize", False, "write a quantized base as float32 weights (default: re-quantize "
           "with its own bits and group size)"),
    *output_options("output folder"),
)


def add_fuse_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, FUSE_OPTIONS)


def _base_of(adapter_path) -> Optional[str]:
    """The base model that adapter_config.json records, if any."""
    from ..lora import ADAPTER_CONFIG

    path = Path(adapter_path) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; --adapter-path must be a folder written by "
                              "`mlx-mobilellm lora`")
    try:
        return json.loads(path.read_text()).get("model")
    except (ValueError, AttributeError):
        return None  # load_adapters reports what is wrong with the file


def run_fuse(args: argparse.Namespace) -> None:
    from convert.destination import check_destination
    from convert.export import export_hf
    from convert.save import save_model

    from ..compute_dtype import dequantized
    from ..formats.sources import open_checkpoint
    from ..loading import load
    from ..lora import fuse

    recorded = _base_of(args.adapter_path)
    spec = args.model or recorded or model_spec(None)
    inputs = [spec, args.adapter_path]
    # Refused before the fusing: outputs that may not be written, or that would overlap.
    check_destination(args.save_path, args.force, inputs)
    if args.export_hf:
        save, hf = Path(args.save_path).resolve(), Path(args.export_hf).resolve()
        if hf == save or hf in save.parents or save in hf.parents:
            raise CheckpointError(f"--export-hf {args.export_hf}: must lie apart from --save-path "
                                  f"{args.save_path}, neither inside the other")
        check_destination(args.export_hf, args.force, [*inputs, args.save_path])
    model, _ = load(spec, adapter_path=args.adapter_path)
    fuse(model, dequantize=args.dequantize)
    if args.dequantize and any(".scales" in name for name in parameter_names(model)):
        model = dequantized(model)  # the embedding and the layers without adapters
    base = open_checkpoint(spec, quiet=args.quiet)  # its format and tokenizer files
    # The format export writes back by default; none for an MLX folder that records none.
    source_format = base.original_format if base.source_format == "mlx" else base.export_format
    readme = (f"# {Path(args.save_path).name}\n\nMLX model folder written by `mlx-mobilellm fuse`: "
              f"`{spec}` with the adapters of `{args.adapter_path}` merged into its weights.\n")
    save_model(model, args.save_path, source_format, base, readme=readme, force=args.force,
               sources=inputs, quiet=args.quiet)
    if not args.quiet:
        print(f"wrote {args.save_path}", file=sys.stderr)
    if args.export_hf:
        export_hf(args.save_path, args.export_hf, force=args.force, quiet=args.quiet)
        if not args.quiet:
            print(f"wrote {args.export_hf}", file=sys.stderr)
