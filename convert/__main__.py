"""`python -m convert [convert] ARGS` converts, `python -m convert export ARGS` exports: the
`mlx-mobilellm convert|export` commands under another name."""

import sys

from mlx_mobilellm.cli import main

argv = sys.argv[1:]
if not argv or argv[0] not in ("convert", "export"):
    argv = ["convert", *argv]
sys.exit(main(argv, prog="python -m convert"))
