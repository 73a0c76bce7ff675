"""SLURM launch: an sbatch script rendered into the run directory, submitted with ``sbatch``.

The script (``<run_dir>/launch.sbatch``), in order:

1. ``#SBATCH`` lines: job name, nodes, one task per node, GPUs per node, time limit, partition,
   account, ``--requeue``, ``--signal=B:USR1@<grace>`` (the batch shell gets USR1 ``grace``
   seconds before the time limit), output appended to ``<run_dir>/logs/slurm-<job id>.out``
   (a requeued job keeps its id, so one file holds every restart), then the profile's options.
2. The profile's set-up lines (modules, a container, a virtual environment) and variables.
3. The rendezvous: the first allocated host (``scontrol show hostnames``), by the address
   Slurm reaches it at (its NodeAddr), and a port fixed by the job id.
4. Signal forwarding: USR1 (the time limit) or TERM (preemption) to the batch shell is sent on
   to every process of the job's steps with ``scancel --signal``; the training processes then
   finish their step, save a checkpoint with the data position, and exit.
5. One ``srun`` task per node, each starting ``torch.distributed.run`` (torchrun) with
   ``--nproc_per_node`` ranks, ``--nnodes`` and ``--node_rank`` from Slurm; torchrun itself
   ignores USR1 (its default action would kill it and its ranks with it). Each node's output goes
   to ``<run_dir>/logs/node<N>-<job id>.out``; each rank logs to ``<run_dir>/logs/rank<R>.log``.
6. After the step: a finished run ends the job; a run stopped by a signal is requeued with
   ``scontrol requeue`` (``--requeue`` alone does not bring back a job that exited on its own)
   and resumes from its newest checkpoint in the same run directory; any other exit is the job's
   exit code.

Cluster-specific lines live in a profile file (YAML), never in code::

    sbatch: {qos: high, cpus-per-task: 32, exclusive: null}   # extra #SBATCH options
    setup: ["module load cuda/12.4", "source ~/venvs/eoforge/bin/activate"]
    env: {NCCL_SOCKET_IFNAME: ib0}
    srun: ["--container-image=nvcr.io/nvidia/pytorch:24.10-py3"]
    python: python                                           # default: this interpreter
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import yaml

from eoforge.launch.config import ConfigError

SCRIPT_NAME = "launch.sbatch"
_TIME = re.compile(r"^(?:(\d+)-)?(\d+):(\d{2}):(\d{2})$")


@dataclass
class ClusterProfile:
    """Cluster-specific parts of the script (module docstring).

    Attributes:
        sbatch: extra ``#SBATCH`` options, name -> value (None: a flag such as ``exclusive``).
        setup: shell lines run before the launch.
        env: variables exported before the launch.
        srun: extra ``srun`` options.
        python: the interpreter on the compute nodes (default: the one running this).
    """

    sbatch: dict = field(default_factory=dict)
    setup: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    srun: list = field(default_factory=list)
    python: str = field(default_factory=lambda: sys.executable)


def load_profile(path: str | Path | None) -> ClusterProfile:
    """The profile in ``path`` (YAML), or the empty profile.

    Raises:
        ConfigError: naming the file and the key that is unknown or of the wrong type.
    """
    if path is None:
        return ClusterProfile()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cluster profile {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a cluster profile is a mapping of {_profile_keys()}")
    known = {f.name: f for f in fields(ClusterProfile)}
    types = {"sbatch": dict, "setup": list, "env": dict, "srun": list, "python": str}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r}; a profile has {_profile_keys()}")
        if not isinstance(value, types[key]):
            raise ConfigError(f"{path}: {key} must be a {types[key].__name__}, got {value!r}")
    return ClusterProfile(**data)


def _profile_keys() -> str:
    return ", ".join(f.name for f in fields(ClusterProfile))


@dataclass
class SlurmJob:
    """What to run where (see ``render_script``).

    Attributes:
        run_dir: the run directory (the script, logs and checkpoints go there).
        command: the eoforge arguments each rank runs, e.g. ``["pretrain", "--config", "mae"]``.
        nodes: nodes to allocate.
        gpus_per_node: GPUs per node (0: a CPU job).
        nproc_per_node: ranks per node (default: ``gpus_per_node``, or 1 on CPU).
        time: time limit, ``[D-]HH:MM:SS``.
        partition: the partition.
        account: the account to charge, if any.
        grace: seconds before the time limit at which the job is told to save and stop.
        profile: cluster-specific lines.
    """

    run_dir: Path
    command: list[str]
    nodes: int
    gpus_per_node: int
    time: str
    partition: str
    account: str | None = None
    nproc_per_node: int | None = None
    grace: int = 180
    profile: ClusterProfile = field(default_factory=ClusterProfile)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir).resolve()
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise ConfigError(
                f"--nodes must be >= 1 and --gpus-per-node >= 0, got {self.nodes} and "
                f"{self.gpus_per_node}"
            )
        if self.nproc_per_node is None:
            self.nproc_per_node = self.gpus_per_node or 1
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        limit = time_limit_seconds(self.time)
        if not 0 < self.grace < limit:
            raise ConfigError(
                f"--signal-grace {self.grace} s must be positive and shorter than the time limit "
                f"{self.time} ({limit} s)"
            )

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def script_path(self) -> Path:
        return self.run_dir / SCRIPT_NAME


def time_limit_seconds(text: str) -> int:
    """Seconds of a ``[D-]HH:MM:SS`` time limit.

    Raises:
        ConfigError: naming the value when it is not of that form.
    """
    match = _TIME.match(text)
    if not match:
        raise ConfigError(f"--time {text!r}: give the limit as HH:MM:SS or D-HH:MM:SS")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    if minutes > 59 or seconds > 59:
        raise ConfigError(f"--time {text!r}: minutes and seconds run from 00 to 59")
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def render_script(job: SlurmJob, argv: list[str] | None = None) -> str:
    """The sbatch script of ``job`` (module docstring); ``argv`` is recorded in a comment."""
    run = shlex.quote(str(job.run_dir))
    logs = job.run_dir / "logs"
    options = {
        "job-name": f"eoforge-{job.run_dir.name}",
        "nodes": job.nodes,
        "ntasks-per-node": 1,
        **({"gpus-per-node": job.gpus_per_node} if job.gpus_per_node else {}),
        "time": job.time,
        "partition": job.partition,
        **({"account": job.account} if job.account else {}),
        "requeue": None,
        "signal": f"B:USR1@{job.grace}",
        "open-mode": "append",
        "output": str(logs / "slurm-%j.out"),
        **job.profile.sbatch,
    }
    lines = ["#!/bin/bash"]
    for name, value in options.items():
        lines.append(f"#SBATCH --{name}" + ("" if value is None else f"={value}"))
    lines += [
        f"# Written by eoforge launch slurm, {datetime.now(UTC).isoformat(timespec='seconds')}",
        *([f"# {shlex.join(argv)}"] if argv else []),
        "",
    ]
    if job.profile.setup:
        lines += ["# Cluster profile: set-up", *job.profile.setup, ""]
    for name, value in job.profile.env.items():
        lines.append(f"export {name}={shlex.quote(str(value))}")
    if job.gpus_per_node:
        lines.append("export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a failed rank ends the job")
    torchrun = [
        job.profile.python, "-m", "torch.distributed.run",
        "--nnodes=$SLURM_NNODES", "--node_rank=$SLURM_NODEID",
        f"--nproc_per_node={job.nproc_per_node}",
        "--master_addr=$MASTER_ADDR", "--master_port=$MASTER_PORT",
        "-m", "eoforge.launch.cli", *job.command,
    ]  # fmt: skip
    # $-variables are expanded by the node's shell, everything else is quoted as given.
    node_command = " ".join(
        a if a.startswith("--") and "=$" in a else shlex.quote(a) for a in torchrun
    )
    node_shell = 'trap "" USR1; exec ' + node_command
    srun = shlex.join(
        [
            "srun",
            "--ntasks-per-node=1",
            "--kill-on-bad-exit=1",
            "--open-mode=append",
            f"--output={logs / 'node%n-%j.out'}",
            *job.profile.srun,
        ]
    )
    lines += [
        "",
        "set -u",
        f"RUN_DIR={run}",
        'first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "MASTER_ADDR=$(scontrol show node \"$first\" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')",
        "export MASTER_ADDR=${MASTER_ADDR:-$first}",
        "export MASTER_PORT=$((20000 + ${SLURM_JOB_ID%%_*} % 20000))",
        'echo "$(date -Is) job $SLURM_JOB_ID start ${SLURM_RESTART_COUNT:-0} on'
        ' $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT"',
        "",
        "# USR1 (time limit) or TERM (preemption): every rank saves at the end of its step, exits.",
        "stopping=0",
        'forward() { stopping=1; echo "$(date -Is) got $1: asking the ranks to save and stop";'
        ' scancel --signal="$1" "$SLURM_JOB_ID"; }',
        "trap 'forward USR1' USR1",
        "trap 'forward TERM' TERM",
        "",
        f"{srun} bash -c {shlex.quote(node_shell)} &",
        "step=$!",
        "while true; do  # wait returns early when a trapped signal arrives",
        '    wait "$step"; code=$?',
        '    kill -0 "$step" 2>/dev/null || break',
        "done",
        'if [ -f "$RUN_DIR/finished.json" ]; then',
        '    echo "$(date -Is) run finished"; exit 0',
        'elif [ "$stopping" = 1 ]; then',
        '    echo "$(date -Is) saved; requeueing job $SLURM_JOB_ID to resume"',
        '    scontrol requeue "$SLURM_JOB_ID"; exit 0',
        "fi",
        'echo "$(date -Is) training exited with code $code"',
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def write_script(job: SlurmJob, argv: list[str] | None = None) -> Path:
    """Render the script into the run directory (creating it and its logs folder)."""
    (job.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    job.script_path.write_text(render_script(job, argv))
    job.script_path.chmod(0o755)
    return job.script_path


def submit(script: Path) -> str:
    """Submit ``script`` with sbatch; returns the job id.

    Raises:
        ConfigError: when sbatch is missing or refuses the job (its message included).
    """
    try:
        result = subprocess.run(
            ["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise ConfigError("sbatch is not on PATH: run this on a Slurm login node") from None
    if result.returncode != 0:
        raise ConfigError(f"sbatch refused {script}: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]
