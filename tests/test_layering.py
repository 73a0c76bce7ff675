"""Layering: models and datasets are leaves, pretrain and finetune are siblings, and launch never
reaches up into them (the CLI discovers the verbs each layer declares)."""

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


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_imports(package):
    for path in (REPO_ROOT / package).rglob("*.py"):
        for module in _imports(path):
            parts = module.split(".")
            if parts[0] == "eoforge" and len(parts) > 1:
                assert parts[1] not in FORBIDDEN[package], f"{path.name} imports {module}"
            assert parts[0] not in {"datasets", "models", "pretrain", "finetune", "launch"}, (
                f"{path.name} imports bare {module}; use eoforge.{module}"
            )
