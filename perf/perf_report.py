"""What every benchmark in perf/ records about its machine, and how it writes its results."""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU model: platform.processor(), else /proc/cpuinfo's model name (Linux)."""
    if platform.processor():
        return platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), ""
    )


def machine(threads: int | None = None) -> dict:
    """The machine a benchmark ran on, for its JSON; ``threads`` = torch threads used, if set."""
    info = {
        "processor": cpu_model(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if threads is not None:
        info["torch_threads"] = threads
    return info


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def write_results(out: Path, name: str, result: dict, markdown: Callable[[dict], str]) -> str:
    """Write ``out/name.json`` and ``out/name.md``; returns (and prints) the Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / f"{name}.md").write_text(table)
    print(table)
    return table
