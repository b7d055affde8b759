"""The package's shape is what the README's layout tree says: every module listed, each importing
only modules above it (so no import loop), and no import hidden in a string."""

from __future__ import annotations

import ast
import re

from conftest import REPO

SRC = REPO / "src" / "slmkit"


def readme_layers() -> list[str]:
    """The units of the README's layout tree, top to bottom: `model.py` -> model, `cli/` -> cli."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"- Layout \(`src/slmkit/`\).*?```\n(.*?)```", text, flags=re.S)
    assert block, "the README's Development section lost its layout tree"
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    return [line.split()[0].removesuffix(".py").removesuffix("/") for line in lines]


def unit(module: str) -> str:
    """slmkit.tokenizers.bpe -> tokenizers; slmkit.model -> model; slmkit -> '' (the package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_of(path) -> set[str]:
    """Every slmkit module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("slmkit")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("slmkit"):
            found |= {f"{node.module}.{a.name}" if node.module == "slmkit" else node.module for a in node.names}
    return found


def source_units() -> set[str]:
    return {p.stem if p.parent == SRC else p.parent.relative_to(SRC).parts[0] for p in SRC.rglob("*.py")} - {
        "__init__", "__main__"}


def test_the_readme_tree_lists_every_module_once():
    layers = readme_layers()
    assert len(layers) == len(set(layers))
    assert set(layers) == source_units()


def test_each_module_imports_only_modules_above_it():
    order = {name: i for i, name in enumerate(readme_layers())}
    wrong = []
    for path in SRC.rglob("*.py"):
        here = path.stem if path.parent == SRC else path.parent.relative_to(SRC).parts[0]
        if here in ("__init__", "__main__"):
            continue
        for module in imports_of(path):
            there = unit(module)
            if there in ("", here) or there.startswith("__"):
                continue  # the package itself (its version) and a package's own modules
            if order[there] >= order[here]:
                wrong.append(f"{path.relative_to(SRC)} imports {module}")
    assert not wrong, "imports against the README's layer order:\n" + "\n".join(sorted(wrong))


def test_no_import_is_hidden_in_a_string():
    hidden = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
              if re.search(r"__import__\(|import_module\(", p.read_text())]
    assert not hidden, f"string imports in {hidden}"
