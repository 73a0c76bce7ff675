"""Packaging: the eoforge namespace maps every top-level folder, and bare `datasets` is refused."""

from __future__ import annotations

import configparser
import subprocess
import sys

from conftest import REPO_ROOT

CODE_FOLDERS = {"datasets", "models", "pretrain", "finetune", "launch"}


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / "setup.cfg")
    return cfg


def test_packaged_subpackages_match_folders_on_disk():
    cfg = _setup_cfg()
    packages = {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}
    mapping = dict(
        (k.strip(), v.strip())
        for k, v in (line.split("=") for line in cfg["options"]["package_dir"].strip().splitlines())
    )
    on_disk = {p.name for p in REPO_ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert on_disk == CODE_FOLDERS, f"python package folders on disk: {sorted(on_disk)}"
    # Nested packages (finetune/protocols) need an entry of their own: wheels carry only those
    # listed; their folders follow from their parent's mapping.
    nested = {
        "eoforge." + ".".join(p.relative_to(REPO_ROOT).parts[:-1])
        for folder in CODE_FOLDERS
        for p in (REPO_ROOT / folder).glob("*/**/__init__.py")
    }
    assert packages == {f"eoforge.{name}" for name in on_disk} | nested
    assert mapping == {f"eoforge.{name}": name for name in on_disk}


def test_installed_namespace_resolves_to_the_folders():
    import eoforge.datasets
    import eoforge.finetune
    import eoforge.launch
    import eoforge.models
    import eoforge.pretrain

    for module in (
        eoforge.datasets,
        eoforge.models,
        eoforge.pretrain,
        eoforge.finetune,
        eoforge.launch,
    ):
        folder = module.__name__.split(".")[1]
        assert module.__file__ == str(REPO_ROOT / folder / "__init__.py")


def test_shipped_configs_are_package_data():
    cfg = _setup_cfg()
    assert "configs/*.yaml" in cfg["options.package_data"]["eoforge.pretrain"]
    assert (REPO_ROOT / "pretrain" / "configs" / "demo.yaml").is_file()


def test_bare_datasets_import_is_refused():
    result = subprocess.run(
        [sys.executable, "-c", "import datasets"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "eoforge.datasets" in result.stderr


def test_console_script_help_lists_verbs_with_examples():
    result = subprocess.run(
        [sys.executable, "-m", "eoforge.launch.cli", "--help"],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert result.returncode == 0
    for verb in ("data", "pretrain", "release", "eval"):
        assert verb in result.stdout
    for args in (
        ["pretrain", "--help"],
        ["data", "build", "--help"],
        ["release", "build", "--help"],
        ["eval", "linear", "--help"],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "eoforge.launch.cli", *args],
            capture_output=True,
            text=True,
            cwd="/",
        )
        assert out.returncode == 0 and "example" in out.stdout, args
