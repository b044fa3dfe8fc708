"""The layers of DESIGN.md, read off the import statements of every module:

    mlx_mobilellm (the library, readers in formats/)  <-  convert (writers, export)  <-  cli
    mlx_mobilellm (the library)  <-  mlx_mobilellm.server (HTTP)  <-  cli
The library never imports the converter, the server or the command line; the converter never
imports the command line (but for `python -m convert`, which is the command line under another
name); and nothing in models/ imports the command line, the converter or the trainer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set:
    """The absolute names of the modules `path` imports (relative imports resolved)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def sources(package: str) -> list:
    return sorted((ROOT / package.replace(".", "/")).rglob("*.py"))


RULES = [
    # (modules, the packages they must not import)
    ("mlx_mobilellm", ("convert", "mlx_mobilellm.cli", "mlx_mobilellm.server")),
    ("convert", ("mlx_mobilellm.cli",)),
    ("mlx_mobilellm.models", ("convert", "mlx_mobilellm.cli", "mlx_mobilellm.training")),
]
EXEMPT = {"mlx_mobilellm.cli": "the command line sits on top of everything",
          "convert.__main__": "`python -m convert` is the command line"}


@pytest.mark.parametrize("package, forbidden", RULES, ids=[rule[0] for rule in RULES])
def test_no_module_imports_a_layer_above_it(package, forbidden):
    found = {}
    for path in sources(package):
        name = module_name(path)
        if any(under(name, exempt) for exempt in EXEMPT):
            continue
        # A package's modules import each other: only imports from outside it count.
        wrong = sorted(i for i in imports(path)
                       if any(under(i, f) and not under(name, f) for f in forbidden))
        if wrong:
            found[name] = wrong
    assert not found, f"imports from a layer above: {found}"


def test_the_check_sees_imports():
    """The rules above would pass on a tree whose imports it failed to read: the command line's
    own imports of the converter must show."""
    assert any(under(i, "convert") for i in imports(ROOT / "mlx_mobilellm/cli/convert.py"))
    assert "mlx_mobilellm.formats.sources" in imports(ROOT / "mlx_mobilellm/loading.py")
