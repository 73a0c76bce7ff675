"""Training engines. The loop talks to the engine protocol only:

``engine(batch) -> dict of losses``, ``engine.backward_step(loss)``, ``engine.set_lr(lr)``,
``engine.save(dir, step, client_state)``, ``engine.load(dir) -> client_state | None``,
``engine.preview(batch)``, ``engine.grad_norm()``.

``DeepSpeedEngine`` is the production path: ZeRO stage 1/2/3, bf16/fp16/fp32, gloo on CPU and
NCCL on GPU. The optimizer is a torch AdamW handed to DeepSpeed (DeepSpeed's own optimizers
compile C++ ops at first use, which costs a minute per fresh machine for no gain here).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from eoforge.launch.distributed import import_deepspeed

COMPLETE_MARKER = "complete.json"


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norms and learned tokens (1-D or named so)."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name.endswith("token"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() else "fp32"


def deepspeed_config(micro_batch: int, zero_stage: int, precision: str, grad_clip: float) -> dict:
    """The DeepSpeed JSON config eoforge runs with."""
    zero = {
        "stage": zero_stage,
        "overlap_comm": torch.cuda.is_available(),
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
        "allgather_bucket_size": 5e8,
    }
    if zero_stage == 3:
        # Small models otherwise keep every parameter resident and never exercise the gathers.
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 12},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """An objective module wrapped by ``deepspeed.initialize`` with a torch AdamW."""

    def __init__(
        self,
        module: nn.Module,
        *,
        micro_batch: int,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        zero_stage: int = 2,
        precision: str = "auto",
        grad_clip: float = 1.0,
    ):
        deepspeed = import_deepspeed()
        self.precision = resolve_precision(precision)
        groups = param_groups(module, weight_decay)
        optimizer = torch.optim.AdamW(
            groups, lr=lr, betas=tuple(betas), fused=torch.cuda.is_available()
        )
        config = deepspeed_config(micro_batch, zero_stage, self.precision, grad_clip)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=config, dist_init_required=False
        )
        self.device = self.engine.device
        self.zero_stage = zero_stage

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        self.engine.train()
        return self.engine(to_device(batch, self.device))

    def backward_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def grad_norm(self) -> float | None:
        """Global gradient norm of the last step (a host sync: call at logging intervals)."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    @torch.no_grad()
    def preview(self, batch: dict) -> dict:
        self.engine.eval()
        try:
            return self.engine(to_device(batch, self.device), preview=True)
        finally:
            self.engine.train()

    def save(self, directory: str | Path, step: int, client_state: dict, keep_last: int) -> Path:
        """Save a sharded checkpoint tagged by step; a marker written last makes it complete."""
        directory = Path(directory)
        tag = f"step_{step:08d}"
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=client_state)
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            # Written last, and atomically: a checkpoint without it is never loaded.
            marker = directory / tag / COMPLETE_MARKER
            partial = marker.with_name(f".{COMPLETE_MARKER}.tmp")
            partial.write_text(json.dumps({"step": step}))
            os.replace(partial, marker)
            for old in complete_checkpoints(directory)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()
        return directory / tag

    def load(self, directory: str | Path) -> dict | None:
        """Load the newest complete checkpoint; returns its client state, or None if none."""
        found = complete_checkpoints(directory)
        if not found:
            return None
        path, client_state = self.engine.load_checkpoint(str(directory), tag=found[-1].name)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {found[-1]}")
        return client_state


def complete_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint folders that carry the completion marker, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p.parent for p in directory.glob(f"step_*/{COMPLETE_MARKER}"))


def to_device(batch, device):
    """Move every tensor of a nested batch to ``device`` (strings and numbers stay)."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple) and batch and torch.is_tensor(batch[0]):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
