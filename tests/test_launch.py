"""Launching: rank detection (torchrun, Slurm, single process), the rendered sbatch script and the
launch verbs' checks, without a cluster (the real Slurm run is in test_slurm.py)."""

from __future__ import annotations

import glob
import os
import shlex
import subprocess
import sys

import pytest

from eoforge.launch.cli import main
from eoforge.launch.config import ConfigError
from eoforge.launch.distributed import detect_env, expand_hostlist, free_port, slurm_port
from eoforge.launch.slurm import SlurmJob, load_profile, render_script, time_limit_seconds

SRUN_TASK = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "2",
    "SLURM_JOB_NODELIST": "gpu[07-10]",
}


def test_torchrun_environment():
    env = detect_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "h1",
            "MASTER_PORT": "123",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (
        3, 4, 1, "h1", 123,
    )  # fmt: skip


def test_torchrun_wins_over_the_slurm_task_it_runs_in():
    env = detect_env(SRUN_TASK | {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert (env.rank, env.world_size) == (0, 2)


def test_slurm_task_environment():
    env = detect_env(SRUN_TASK)
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    assert env.master_addr == "gpu07"  # the first host of the allocation
    assert env.master_port == slurm_port("4242") == 24242
    given = detect_env(SRUN_TASK | {"MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29400"})
    assert (given.master_addr, given.master_port) == ("10.0.0.7", 29400)


def test_batch_shell_and_plain_process_are_single_processes():
    batch = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_ID"}
    for env in (detect_env(batch), detect_env({})):
        assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (
            0, 1, 0, "127.0.0.1",
        )  # fmt: skip
        assert env.master_port > 0


def test_process_group_leaves_no_shared_memory_behind():
    """DeepSpeed's inference all-reduce maps a 66 MiB /dev/shm segment per rank when LOCAL_SIZE
    is set and never removes it; a training process must not create one."""
    port = free_port()
    env = os.environ | {"LOCAL_SIZE": "1", "DS_ACCELERATOR": "cpu"}
    script = (
        "import torch.distributed as dist\n"
        "from eoforge.launch.distributed import DistEnv, init_distributed\n"
        f"init_distributed(DistEnv(0, 1, 0, '127.0.0.1', {port}))\n"
        "assert dist.is_initialized()\n"
        "dist.destroy_process_group()\n"
    )
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*") == []


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("n1", ["n1"]),
        ("n[1-2]", ["n1", "n2"]),
        ("gpu[01-03,07],login", ["gpu01", "gpu02", "gpu03", "gpu07", "login"]),
        ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),
        ("a[9-11]", ["a9", "a10", "a11"]),
    ],
)
def test_hostlists_expand_as_scontrol_does(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def job(tmp_path, **kwargs) -> SlurmJob:
    options = {
        "run_dir": tmp_path / "run",
        "command": ["pretrain", "--config", "/cfg/mae.yaml", "data.shards=[a b]", "steps=10"],
        "nodes": 2,
        "gpus_per_node": 4,
        "time": "1-02:00:00",
        "partition": "gpu",
    }
    return SlurmJob(**(options | kwargs))


def test_script_lines(tmp_path):
    profile = tmp_path / "cluster.yaml"
    profile.write_text(
        "sbatch: {qos: high, exclusive: null}\n"
        "setup: ['module load cuda/12.4']\n"
        "env: {NCCL_SOCKET_IFNAME: ib0}\n"
        "srun: ['--container-image=img.sqsh']\n"
        "python: /opt/venv/bin/python\n"
    )
    script = render_script(job(tmp_path, account="proj", profile=load_profile(profile)))
    run = tmp_path / "run"
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=1-02:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@180",
        f"#SBATCH --output={run}/logs/slurm-%j.out",
        "#SBATCH --qos=high",
        "#SBATCH --exclusive",
        "module load cuda/12.4",
        "export NCCL_SOCKET_IFNAME=ib0",
        'first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'scontrol requeue "$SLURM_JOB_ID"; exit 0',
    ):
        assert line in script.splitlines() or line in script, line
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    assert "--container-image=img.sqsh" in srun and "--kill-on-bad-exit=1" in srun
    assert "/opt/venv/bin/python -m torch.distributed.run" in srun
    assert "--nproc_per_node=4 --nnodes" not in srun  # nodes and node rank come from Slurm
    assert "--nnodes=$SLURM_NNODES --node_rank=$SLURM_NODEID --nproc_per_node=4" in srun
    assert 'trap "" USR1; exec' in srun  # torchrun ignores USR1; the ranks handle it
    # The whole script parses, and the override with a space reaches the ranks as one argument.
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    words = shlex.split(srun.removesuffix(" &"))
    node_shell = words[words.index("-c") + 1]
    assert node_shell.startswith('trap "" USR1; exec ')
    assert "data.shards=[a b]" in shlex.split(node_shell.split("exec ", 1)[1])


def test_cpu_job_has_no_gpu_line_and_runs_nproc_ranks(tmp_path):
    script = render_script(job(tmp_path, gpus_per_node=0, nproc_per_node=3))
    assert "--gpus-per-node" not in script and "NCCL" not in script
    assert "--nproc_per_node=3" in script


def test_bad_launch_options_are_named(tmp_path):
    for kwargs, message in (
        ({"time": "90:00"}, "--time '90:00'"),
        ({"time": "01:61:00"}, "minutes and seconds"),
        ({"time": "00:02:00"}, "--signal-grace 180 s"),
        ({"nodes": 0}, "--nodes must be >= 1"),
        ({"gpus_per_node": 0, "nproc_per_node": 0}, "--nproc-per-node must be >= 1"),
    ):
        with pytest.raises(ConfigError, match=message):
            job(tmp_path, **kwargs)
    assert time_limit_seconds("2-00:00:30") == 2 * 86400 + 30
    profile = tmp_path / "p.yaml"
    profile.write_text("modules: [cuda]\n")
    with pytest.raises(ConfigError, match="unknown key 'modules'"):
        load_profile(profile)
    profile.write_text("setup: module load cuda\n")
    with pytest.raises(ConfigError, match="setup must be a list"):
        load_profile(profile)


SLURM = ["launch", "slurm", "--nodes", "2", "--gpus-per-node", "0", "--time", "00:10:00"]


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "runs" / "x"
    argv = [*SLURM, "--partition", "debug", "--dry-run", "--", "pretrain", f"run_dir={run}"]
    assert main(argv) == 0
    script = capsys.readouterr().out
    assert script.startswith("#!/bin/bash") and f"RUN_DIR={run}" in script
    assert "eoforge.launch.cli pretrain --config " in script and f"run_dir={run}" in script
    assert not run.exists()


def test_launch_checks_the_run_before_submitting(tmp_path, capsys):
    run = f"run_dir={tmp_path / 'r'}"
    base = [*SLURM, "--partition", "debug", "--"]
    for argv, message in (
        ([*base, "pretrain", "bogus=1", run], "Key 'bogus' not in 'PretrainConfig'"),
        ([*base, "pretrain", "new_run=true", run], "new_run=true would wipe the run"),
        ([*base, "pretrain", "steps=0", run], "steps=0: must be >= 1"),
        ([*base, "eval", "linear"], "-- pretrain"),
        (["launch", "local", "--nproc", "2", "--", "pretrain", "engine.zero_stage=4", run],
         "engine.zero_stage=4"),
    ):  # fmt: skip
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
