"""The run directory: config.yaml, env.json, logs/, tb/, checkpoints/, release/.

Relaunching the same command finds the checkpoints here and resumes; a finished run is marked
by ``finished.json``.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

TRACKED_PACKAGES = (
    "eoforge",
    "torch",
    "deepspeed",
    "timm",
    "webdataset",
    "rasterio",
    "numpy",
    "xarray",
    "zarr",
    "omegaconf",
    "safetensors",
    "tensorboard",
)


class RunDir:
    """Paths of one run and the files that describe it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.logs = self.path / "logs"
        self.tensorboard = self.path / "tb"
        self.release = self.path / "release"
        self.finished_marker = self.path / "finished.json"

    @property
    def finished(self) -> bool:
        return self.finished_marker.is_file()

    def create(self) -> None:
        for folder in (self.path, self.checkpoints, self.logs, self.tensorboard):
            folder.mkdir(parents=True, exist_ok=True)

    def write_env(self, world_size: int) -> None:
        """env.json: git sha, package versions, world size, host, command line."""
        env = {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_sha": git_sha(),
            "packages": package_versions(),
            "world_size": world_size,
            "python": sys.version.split()[0],
            "host": platform.node(),
            "argv": sys.argv,
        }
        (self.path / "env.json").write_text(json.dumps(env, indent=2))

    def mark_finished(self, step: int) -> None:
        self.finished_marker.write_text(
            json.dumps({"step": step, "time": datetime.now(UTC).isoformat()})
        )


def git_sha() -> str | None:
    """Commit of the eoforge source tree this process runs from, if it is a git checkout."""
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions
