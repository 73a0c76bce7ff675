"""The ``eoforge launch`` verbs: start a verb on several ranks, on a Slurm cluster or on this
node. The verb to launch is any whose parser's defaults carry ``launch_command(args, world_size)
-> (argv, run_dir)`` (``pretrain``): it checks its arguments for the world size and returns what
every rank runs, so launch checks a pretraining config without importing pretrain/."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

SLURM_EXAMPLES = """examples:
  eoforge launch slurm --nodes 2 --gpus-per-node 8 --time 24:00:00 --partition gpu \\
      --profile cluster.yaml -- pretrain --config mae data.shards=[shards/s2] run_dir=runs/mae
  eoforge launch slurm --nodes 1 --gpus-per-node 4 --time 01:00:00 --partition debug --dry-run \\
      -- pretrain --config mae run_dir=runs/try
The script is written to RUN_DIR/launch.sbatch; sbatch it again to resume by hand."""

LOCAL_EXAMPLES = """example:
  eoforge launch local --nproc 8 -- pretrain --config mae data.shards=[shards/s2] run_dir=runs/mae"""


def register_launch(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``eoforge launch``: the group of the launch verbs."""
    help_text = "start pretraining on a Slurm cluster or on this node"
    return commands.add_parser("launch", help=help_text, description=help_text)


def register_slurm(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``eoforge launch slurm ... -- VERB ...``."""
    help_text = (
        "render an sbatch script into the run directory and submit it (requeued and resumed "
        "automatically after the time limit or preemption)"
    )
    parser = commands.add_parser(
        "slurm",
        help=help_text,
        description=help_text,
        epilog=SLURM_EXAMPLES,
    )
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True, help="0 for a CPU job")
    parser.add_argument(
        "--nproc-per-node", type=int, help="ranks per node (default: the GPUs, or 1 on CPU)"
    )
    parser.add_argument("--time", required=True, help="time limit, HH:MM:SS or D-HH:MM:SS")
    parser.add_argument("--partition", required=True)
    parser.add_argument("--account")
    parser.add_argument(
        "--profile", help="cluster profile YAML: extra sbatch options, set-up lines, env, srun"
    )
    parser.add_argument(
        "--signal-grace",
        type=int,
        default=180,
        metavar="S",
        help="seconds before the time limit at which to save and requeue (default 180)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- pretrain [--config C] ...")
    parser.set_defaults(run=run_slurm)
    return parser


def register_local(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``eoforge launch local --nproc K -- VERB ...``."""
    help_text = "pretrain with K ranks on this node (torchrun)"
    parser = commands.add_parser(
        "local",
        help=help_text,
        description=help_text,
        epilog=LOCAL_EXAMPLES,
    )
    parser.add_argument("--nproc", type=int, required=True, help="ranks (one per GPU)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- pretrain [--config C] ...")
    parser.set_defaults(run=run_local)
    return parser


def run_slurm(args: argparse.Namespace) -> int:
    """Render the sbatch script of the launched verb; print it, or write and submit it."""
    from eoforge.launch.slurm import SlurmJob, load_profile, render_script, submit, write_script

    job = SlurmJob(
        run_dir=Path.cwd(),  # the launched verb names the run folder below
        command=[],
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        nproc_per_node=args.nproc_per_node,
        time=args.time,
        partition=args.partition,
        account=args.account,
        grace=args.signal_grace,
        profile=load_profile(args.profile),
    )
    command, run_dir = launched_command(args.command, job.world_size)
    job = dataclasses.replace(job, run_dir=run_dir, command=command)
    argv = ["eoforge", *args.argv]
    if args.dry_run:
        print(render_script(job, argv), end="")
        return 0
    script = write_script(job, argv)
    job_id = submit(script)
    logs = job.run_dir / "logs"
    print(
        f"submitted job {job_id}: {script}\n"
        f"  job log:   {logs}/slurm-{job_id}.out (every restart appends)\n"
        f"  per node:  {logs}/node<N>-{job_id}.out; per rank: {logs}/rank<R>.log\n"
        f"  resume by hand (after a cancel or a crash): sbatch {script}"
    )
    return 0


def run_local(args: argparse.Namespace) -> int:
    """Run the launched verb on ``--nproc`` ranks of this node through torchrun."""
    import subprocess

    command, _ = launched_command(args.command, args.nproc)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*torchrun, f"--nproc_per_node={args.nproc}", "-m", "eoforge.launch.cli", *command]
    return subprocess.run(cmd, check=False).returncode


def launched_command(tokens: list[str], world_size: int) -> tuple[list[str], Path]:
    """``-- VERB ...`` of a launch verb -> (the arguments every rank runs, the run folder), as
    the verb's ``launch_command`` gives them after checking them for ``world_size`` ranks.

    Raises:
        ConfigError: when no launchable verb is named, or the verb's arguments do not hold.
    """
    from eoforge.launch.cli import build_parser
    from eoforge.launch.config import ConfigError

    tokens = tokens[1:] if tokens[:1] == ["--"] else tokens
    parser = build_parser()
    launchable = [
        words for words, verb in parser.verbs.items() if verb.get_default("launch_command")
    ]
    if not any(tuple(tokens[: len(words)]) == words for words in launchable):
        usage = " or ".join(f"-- {' '.join(words)} ..." for words in launchable)
        raise ConfigError(f"name the command to launch after --: {usage}")
    args = parser.parse_args(tokens)
    return args.launch_command(args, world_size)
