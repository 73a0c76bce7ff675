"""Process-group set-up: rank detection from torchrun (or none) and DeepSpeed's init.

Single processes started without a launcher get RANK/WORLD_SIZE/MASTER_* set here, so
DeepSpeed does not go looking for MPI.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank, world size, local rank and master address of this process.

    In order: a torchrun-style environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); a Slurm task started by srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and,
    for the master, MASTER_ADDR or else the first host of SLURM_JOB_NODELIST, and MASTER_PORT
    or else a port derived from SLURM_JOB_ID, so that every task agrees without talking);
    otherwise a plain single process, rank 0 of 1 on localhost. A Slurm batch script outside
    srun (no SLURM_STEP_ID) is a single process: its SLURM_NTASKS counts tasks it has not
    started.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR")
            or expand_hostlist(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))[0],
            master_port=int(env.get("MASTER_PORT") or slurm_port(env.get("SLURM_JOB_ID", "0"))),
        )
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port())


def slurm_port(job_id: str | int) -> int:
    """The rendezvous port of a Slurm job: fixed by its id (jobs sharing a node differ), in
    20000-39999, below the usual ephemeral range."""
    return 20000 + int(str(job_id).split("_")[0]) % 20000


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list, expanded in order (what ``scontrol show hostnames`` prints):
    ``"gpu[01-03,07],login"`` -> ``["gpu01", "gpu02", "gpu03", "gpu07", "login"]``; zero
    padding is kept, and several bracket groups in one name expand as a product."""
    hosts: list[str] = []
    for name in _split_top_level(hostlist):
        expanded = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", name):
            choices = [""]
            if ranges:
                choices = []
                for part in ranges.split(","):
                    low, _, high = part.partition("-")
                    if not high:
                        choices.append(low)
                        continue
                    width = len(low)
                    choices += [f"{i:0{width}d}" for i in range(int(low), int(high) + 1)]
            expanded = [e + literal + c for e in expanded for c in choices]
        hosts += [h for h in expanded if h]
    return hosts


def _split_top_level(hostlist: str) -> list[str]:
    """Split at commas outside brackets."""
    parts, depth, current = [], 0, ""
    for ch in hostlist:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p for p in [*parts, current] if p]


def backend_for_device() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def import_deepspeed():
    """Import DeepSpeed, telling it to use the CPU accelerator where no GPU is usable.

    CUDA builds of torch on GPU-less machines otherwise leave DeepSpeed guessing.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def init_distributed(dist_env: DistEnv | None = None) -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPU, gloo on CPU)."""
    deepspeed = import_deepspeed()

    dist_env = dist_env or detect_env()
    os.environ.update(
        RANK=str(dist_env.rank),
        WORLD_SIZE=str(dist_env.world_size),
        LOCAL_RANK=str(dist_env.local_rank),
        MASTER_ADDR=dist_env.master_addr,
        MASTER_PORT=str(dist_env.master_port),
    )
    # LOCAL_SIZE switches on DeepSpeed's shared-memory all-reduce, which serves inference only
    # and leaves a 66 MiB segment per rank in /dev/shm that nothing removes: training never
    # uses it, and on a long-lived host the segments fill the memory.
    os.environ.pop("LOCAL_SIZE", None)
    if torch.cuda.is_available():
        torch.cuda.set_device(dist_env.local_rank)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend_for_device(), auto_mpi_discovery=False)
    return dist_env


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank; every rank gets the same answer. Every rank must
    call it at the same point (it is a collective). The all-reduce runs on the CPU over gloo,
    so a GPU run does not wait on its device for it."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=_cpu_group())
    return bool(value.item())


@functools.cache
def _cpu_group():
    """A gloo process group over every rank (None: the default group is gloo already)."""
    if torch.distributed.get_backend() == "gloo":
        return None
    return torch.distributed.new_group(backend="gloo")


def gather_objects(value):
    """``value`` of every rank, in rank order (picklable objects)."""
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of its own slice.

    Every rank's loss may depend on every rank's slice, so the gradient of rank r's slice is the
    sum over ranks of the gradient its gathered copy received: an all_reduce (SUM) of the
    gathered gradient, then rank r's rows. all_reduce rather than reduce_scatter, which gloo
    lacks.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = torch.distributed.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = torch.distributed.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)  # [world * B, ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] from every rank along dim 0 -> [world * B, ...], rank order.

    Gradients flow back to each rank's own slice (summed over the ranks' losses), so contrastive
    negatives from other ranks train this rank's encoder as in one process on the whole batch.
    Every rank must pass the same shape and call it the same number of times (it is a
    collective, in forward and in backward). Identity without an initialised process group or
    with one process.
    """
    if (
        not torch.distributed.is_available()
        or not torch.distributed.is_initialized()
        or torch.distributed.get_world_size() == 1
    ):
        return x
    return _GatherWithGrad.apply(x)
