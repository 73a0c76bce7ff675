"""Layering: models and datasets are leaves, pretrain and finetune are siblings, and launch only
reaches up lazily inside the CLI's functions."""

from __future__ import annotations

import ast

import pytest

from conftest import REPO_ROOT

FORBIDDEN = {
    "models": {"datasets", "pretrain", "finetune", "launch"},
    "datasets": {"models", "pretrain", "finetune", "launch"},
    "launch": {"pretrain", "finetune"},
    "pretrain": {"finetune"},
    "finetune": {"pretrain"},
}


def _imports(path, top_level_only: bool):
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_imports(package):
    for path in (REPO_ROOT / package).glob("*.py"):
        # The CLI may import pretrain/finetune lazily inside functions (never at module level).
        top_level_only = package == "launch" and path.name == "cli.py"
        for module in _imports(path, top_level_only):
            parts = module.split(".")
            if parts[0] == "eoforge" and len(parts) > 1:
                assert parts[1] not in FORBIDDEN[package], f"{path.name} imports {module}"
            assert parts[0] not in {"datasets", "models", "pretrain", "finetune", "launch"}, (
                f"{path.name} imports bare {module}; use eoforge.{module}"
            )
