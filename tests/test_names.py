"""Names that say what they hold: a registered objective or tokenizer lives in the file of its
name, and no module of the package shadows a standard-library module."""

from __future__ import annotations

import sys

import pytest

from eoforge.models.vit import TOKENIZERS
from eoforge.pretrain.objectives import OBJECTIVES

from conftest import REPO_ROOT

PACKAGES = ("datasets", "models", "pretrain", "finetune", "launch")


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_lives_in_the_file_of_its_name(name):
    assert OBJECTIVES[name].split(":")[0] == f"eoforge.pretrain.{name}"


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_tokenizer_lives_in_the_file_of_its_name(name):
    assert TOKENIZERS[name].__module__ == f"eoforge.models.{name}"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_shadows_the_standard_library(package):
    shadowing = [
        path.name for path in (REPO_ROOT / package).glob("*.py")
        if path.stem in sys.stdlib_module_names
    ]  # fmt: skip
    assert not shadowing, f"{package}/ shadows standard-library module(s) {shadowing}"
