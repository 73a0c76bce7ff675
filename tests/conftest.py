"""Shared fixtures: the real sample data folder and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def sample_data_root() -> Path:
    """Where the real satellite samples live: $EOFORGE_SAMPLE_DATA or ../shared/data."""
    return Path(os.environ.get("EOFORGE_SAMPLE_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The real sample data; skips where absent unless EOFORGE_REQUIRE_SAMPLE_DATA=1."""
    root = sample_data_root()
    if not (root / "README.md").exists():
        message = f"real sample data not found at {root} (set EOFORGE_SAMPLE_DATA)"
        if os.environ.get("EOFORGE_REQUIRE_SAMPLE_DATA") == "1":
            pytest.fail(message + "; EOFORGE_REQUIRE_SAMPLE_DATA=1 makes this a failure")
        pytest.skip(message)
    return root


@pytest.fixture(autouse=True)
def no_pipe_backoff(monkeypatch):
    """Failing pipe: reads are retried without pausing in tests (damaged shards are read on
    purpose; the pauses only matter against a real object store)."""
    monkeypatch.setattr("eoforge.datasets.shards.PIPE_BACKOFF_S", 0.0)


def random_release(out: Path, sensors: tuple[str, ...]) -> Path:
    """A release of a randomly initialised ``vit_test_patch8`` (seed 0) over the bands of
    ``sensors``, with identity normalisation, written to ``out``."""
    import torch

    from eoforge.datasets.sensors import band_table, get_sensor
    from eoforge.models import create_model, save_release

    torch.manual_seed(0)
    encoder = create_model("vit_test_patch8")
    bands = [row for sensor in sensors for row in band_table(get_sensor(sensor).bands)]
    card = {
        "bands": bands,
        "normalisation": {b["band_id"]: {"p1": 0, "p99": 1, "mean": 0, "std": 1} for b in bands},
        "objective": {"name": "mae"},
        "data": {},
        "steps": 0,
    }
    return save_release(out, encoder.state_dict(), "vit_test_patch8", {}, card)
