"""A real Slurm (two nodes on this host, see .ci/slurm-up): a 2-task CPU pretraining submitted
through ``eoforge launch slurm`` is signalled mid-run, saves, requeues, resumes and finishes, and
its loss curve equals an uninterrupted ``eoforge launch local`` run of the same config."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pretrain_runs import eoforge, scalars

pytestmark = pytest.mark.slow

STEPS = 80
ARGS = [
    "--config", "demo", f"steps={STEPS}", "log_every=1", "save_every=1000", "image_every=1000",
    "release.export=false", "engine.precision=fp32", "data.batch_size=4",
]  # fmt: skip


@pytest.fixture(scope="module")
def slurm() -> None:
    """A Slurm whose two nodes are up; skips where there is none unless EOFORGE_REQUIRE_SLURM=1."""
    problem = None
    if not shutil.which("sbatch"):
        problem = "sbatch is not installed"
    else:
        nodes = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30
        )
        up = [line for line in nodes.stdout.splitlines() if line.split()[1] in ("idle", "mix")]
        if nodes.returncode != 0 or len(up) < 2:
            problem = f"no Slurm with two idle nodes (sinfo: {nodes.stdout or nodes.stderr})"
    if problem:
        message = f"{problem}; start one with: export SLURM_CONF=$(.ci/slurm-up)"
        if os.environ.get("EOFORGE_REQUIRE_SLURM") == "1":
            pytest.fail(message + " (EOFORGE_REQUIRE_SLURM=1 makes this a failure)")
        pytest.skip(message)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("eoforge-cache")


def wait_for(condition, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            text = log.read_text() if log.is_file() else "(no log)"
            raise AssertionError(f"timed out waiting for {what}; {log}:\n{text[-3000:]}")
        time.sleep(0.2)


def read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def logged_steps(run_dir: Path, tag: str) -> list[int]:
    """Every step at which ``tag`` was logged, duplicates kept, across all events files."""
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return sorted(e.step for e in acc.Scalars(tag))


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory) -> Path:
    """The same run on one node through ``eoforge launch local``, never interrupted."""
    local = tmp_path_factory.mktemp("local") / "run"
    eoforge(["launch", "local", "--nproc", "2", "--", "pretrain", *ARGS, f"run_dir={local}"], cache)
    return local


# USR1: the time-limit signal (--signal=B:USR1@grace); TERM: what preemption sends.
@pytest.mark.parametrize("signal", ["USR1", "TERM"])
def test_signalled_job_requeues_resumes_and_matches_an_uninterrupted_run(
    slurm, cache, uninterrupted, tmp_path, signal
):
    cluster = tmp_path / "slurm"

    submitted = eoforge(
        ["launch", "slurm", "--nodes", "2", "--gpus-per-node", "0", "--time", "00:10:00",
         "--partition", "debug", "--", "pretrain", *ARGS, f"run_dir={cluster}"],
        cache,
    )  # fmt: skip
    job = re.search(r"submitted job (\d+)", submitted.stdout).group(1)
    rank0, job_log = cluster / "logs" / "rank0.log", cluster / "logs" / f"slurm-{job}.out"
    # To the batch shell, as Slurm sends --signal=B:USR1@grace.
    wait_for(lambda: re.search(r"step (1\d|[2-9]\d)/", read(rank0)), 300, "step 10", job_log)
    subprocess.run(["scancel", f"--signal={signal}", "--batch", job], check=True)

    def done() -> bool:
        queue = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True)
        return (cluster / "finished.json").is_file() and not queue.stdout.strip()

    wait_for(done, 300, "the requeued job to finish", job_log)

    log, ranks = read(job_log), read(rank0)
    assert f"got {signal}" in log and f"requeueing job {job}" in log
    assert f"job {job} start 1 " in log and log.rstrip().endswith("run finished")
    stopped = int(re.search(r"saved checkpoint at step (\d+)", ranks).group(1))
    assert 10 <= stopped < STEPS
    assert f"stopping at step {stopped}" in ranks and f"resuming at step {stopped}" in ranks
    assert read(cluster / "logs" / "rank1.log").count(f"saved checkpoint at step {stopped}") == 1

    # The curve goes on without a gap or a repeated step, and equals the uninterrupted run's.
    assert logged_steps(cluster, "loss") == list(range(1, STEPS + 1))
    expected, resumed = scalars(uninterrupted, "loss"), scalars(cluster, "loss")
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
