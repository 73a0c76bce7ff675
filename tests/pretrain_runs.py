"""Launch real pretraining runs in subprocesses (torchrun for several ranks) and read their logs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from eoforge.launch.distributed import free_port


def run_env(cache: Path) -> dict:
    env = dict(os.environ)
    env.update(
        EOFORGE_CACHE=str(cache), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def eoforge(
    args: list[str],
    cache: Path,
    nproc: int = 1,
    timeout: int = 600,
    cwd: Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``eoforge ARGS`` (under torchrun with ``nproc`` ranks when > 1) and return the result."""
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            "-m",
            "eoforge.launch.cli",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "eoforge.launch.cli", *args]
    result = subprocess.run(
        cmd, env=run_env(cache), capture_output=True, text=True, timeout=timeout, cwd=cwd
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    return result


def torchrun_script(
    script: str, args: list[str], cwd: Path, nproc: int = 2, timeout: int = 300
) -> None:
    """Run the Python file ``script`` with ``args`` on ``nproc`` CPU ranks under torchrun (gloo);
    a failing rank fails the test with the tail of the output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        script,
        *args,
    ]
    run = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of a TensorBoard scalar across every events file of a run."""
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def image_tags(run_dir: Path) -> list[str]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    acc.Reload()
    return acc.Tags()["images"]
