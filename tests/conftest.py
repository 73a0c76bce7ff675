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
