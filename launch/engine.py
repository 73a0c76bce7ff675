"""Training engines. The loop talks to the engine protocol only:

``engine(batch) -> dict of losses``, ``engine.backward_step(loss)``, ``engine.set_lr(lr)``,
``engine.save(dir, step, client_state, keep_last)``, ``engine.load(checkpoint) -> client_state``,
``engine.preview(batch)``, ``engine.grad_norm()``, ``engine.full_parameters(params)`` (whole
parameters for an objective's hook after each optimizer step). Checkpoint folders, commits and
resume selection live in ``eoforge.launch.checkpoints``.

``DeepSpeedEngine`` is the production path: ZeRO stage 1/2/3, bf16/fp16/fp32 or fp32 weights
with bf16 autocast, gloo on CPU and NCCL on GPU. The optimizer is a torch AdamW or SGD
(``build_optimizer``, by ``optim.name``) handed to DeepSpeed (DeepSpeed's own optimizers compile C++ ops at first use, which costs a minute per
fresh machine for no gain here).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn

from eoforge.launch.checkpoints import (
    Checkpoint,
    commit,
    partial_tag,
    step_tag,
    to_universal,
    universal_location,
    vet_pickles,
)
from eoforge.launch.config import ConfigError
from eoforge.launch.distributed import import_deepspeed
from eoforge.launch.faults import kill_point

# DeepSpeed's converter to the universal form requires the checkpoint to declare itself.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups: no decay on biases, norms and learned tokens (1-D or named so)."""
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


# optim.name of the pretraining config: the torch optimizers build_optimizer makes.
OPTIMIZERS = ("adamw", "sgd")


def build_optimizer(
    name: str, groups: list[dict], lr: float, betas: tuple[float, float], momentum: float
) -> torch.optim.Optimizer:
    """The torch optimizer ``name`` over ``groups`` (``param_groups``).

    ``adamw`` uses ``betas`` (MAE's recipe); ``sgd`` is SGD with heavy-ball ``momentum``, the
    MoCo-v2 / SeCo recipe (momentum 0.9).

    Raises:
        ConfigError: for an unknown name, naming optim.name and the known ones.
    """
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=torch.cuda.is_available())
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ConfigError(f"optim.name={name!r}: known optimizers are {list(OPTIMIZERS)}")


def resolve_precision(precision: str, zero_stage: int = 2) -> str:
    """``auto``: bf16-autocast on a GPU under ZeRO-1/2, bf16 on a GPU under ZeRO-3, fp32 on a
    CPU; other values are kept.

    On an H100, a compiled ViT-B/16 MAE step under ZeRO-2 ran 1.33x as fast with fp32 weights and
    bf16 autocast as in DeepSpeed's bf16 mode, which keeps bf16 weights beside fp32 master copies
    (perf/results/gpu_h100; one GPU, the eager step not timed). The price, not measured yet:
    under ZeRO-1/2 every rank holds the weights in fp32 (2 bytes more per parameter; ZeRO-1's
    unpartitioned gradients are fp32 too, 2 more) and all-gathers the updated fp32 weights after
    each step, about 6 bytes moved per parameter instead of bf16's 4. ZeRO-3 gathers the weights
    in every forward and backward, its largest traffic, so there ``auto`` keeps them in bf16.
    """
    if precision != "auto":
        return precision
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if zero_stage == 3 else "bf16-autocast"


def deepspeed_config(
    micro_batch: int,
    zero_stage: int,
    precision: str,
    grad_clip: float,
    accumulation: int = 1,
    load_universal: bool = False,
    overlap_comm: bool = False,
) -> dict:
    """The DeepSpeed JSON config eoforge runs with."""
    zero = {
        "stage": zero_stage,
        "overlap_comm": overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
        "allgather_bucket_size": 5e8,
    }
    if zero_stage == 3:
        # Small models otherwise keep every parameter resident and never exercise the gathers.
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 12},
        # fp32 weights and optimizer, bf16 compute under torch.autocast (DeepSpeed >= 0.16).
        "torch_autocast": {"enabled": precision == "bf16-autocast", "dtype": "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


class DeepSpeedEngine:
    """An objective module wrapped by ``deepspeed.initialize`` with a torch optimizer
    (``build_optimizer``: AdamW, or SGD with ``momentum``).

    ``accumulation``: micro-batches per optimizer step (``backward_step`` steps the optimizer on
    the last of them). ``load_universal``: ``load`` will resume a checkpoint written at another
    world size, through DeepSpeed's universal checkpoint form. ``overlap_comm``: ZeRO's gradient
    reduction overlaps the backward pass (default: on GPUs). ``compile``: the objective runs
    through ``torch.compile`` inside DeepSpeed (``engine.compile()``), drawing its random numbers
    as eager code does (inductor's ``fallback_random``, set for the whole process); the first
    steps then pay the compilation.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        micro_batch: int,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        optimizer: str = "adamw",
        momentum: float = 0.9,
        zero_stage: int = 2,
        precision: str = "auto",
        grad_clip: float = 1.0,
        accumulation: int = 1,
        load_universal: bool = False,
        overlap_comm: bool | None = None,
        compile: bool = False,
    ):
        deepspeed = import_deepspeed()
        self.precision = resolve_precision(precision, zero_stage)
        groups = param_groups(module, weight_decay)
        optimizer = build_optimizer(optimizer, groups, lr, betas, momentum)
        if overlap_comm is None:
            overlap_comm = torch.cuda.is_available()
        config = deepspeed_config(
            micro_batch,
            zero_stage,
            self.precision,
            grad_clip,
            accumulation,
            load_universal,
            overlap_comm,
        )
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=config, dist_init_required=False
        )
        if compile:
            # Compiled code would draw random numbers (masks, noise) from its own generator; the
            # eager one keeps a run's masks the same with and without compile, and on resume.
            import torch._inductor.config as inductor

            inductor.fallback_random = True
            self.engine.compile()
        self.device = self.engine.device
        self.zero_stage = zero_stage
        self.load_universal = load_universal

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

    def full_parameters(self, params: list[nn.Parameter]) -> AbstractContextManager:
        """A context in which ``params`` hold their whole values, to read only.

        Under ZeRO-3 each rank holds a partition of every parameter: this gathers them
        (``deepspeed.zero.GatheredParameters``, a collective: every rank enters it with the same
        parameters) and partitions them again on exit, discarding changes. Under ZeRO-1/2 the
        parameters are whole already.
        """
        if self.zero_stage != 3:
            return nullcontext()
        return import_deepspeed().zero.GatheredParameters(params)

    @torch.no_grad()
    def preview(self, batch: dict) -> dict:
        self.engine.eval()
        try:
            return self.engine(to_device(batch, self.device), preview=True)
        finally:
            self.engine.train()

    def save(self, directory: str | Path, step: int, client_state: dict, keep_last: int) -> Path:
        """Write a sharded checkpoint and commit it atomically (``launch.checkpoints``)."""
        directory = Path(directory)
        rank = torch.distributed.get_rank()
        self.engine.save_checkpoint(
            str(directory),
            tag=partial_tag(step),
            client_state={**client_state, **UNIVERSAL_INFO},
            save_latest=False,  # the pointer is written by commit, after the rename
        )
        kill_point("kill_in_save", step, rank)
        torch.distributed.barrier()
        if rank == 0:
            commit(directory, step, torch.distributed.get_world_size(), keep_last, self.precision)
        torch.distributed.barrier()
        return directory / step_tag(step)

    def load(self, checkpoint: Checkpoint) -> dict:
        """Load ``checkpoint`` (its pickles vetted first); returns its client state. The caller
        checks first that it was written in this engine's weight form
        (``refuse_other_precision``): the training loop does so before it touches the run."""
        vet_pickles(checkpoint.path)
        load_dir, tag = checkpoint.path.parent, checkpoint.tag
        if self.load_universal:
            if torch.distributed.get_rank() == 0:
                to_universal(checkpoint)
            torch.distributed.barrier()
            load_dir, tag = universal_location(checkpoint)
            vet_pickles(load_dir / tag)
        path, client_state = self.engine.load_checkpoint(str(load_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
        return client_state


def weights_form(precision: str) -> str:
    """The dtype DeepSpeed keeps a module's weights in under ``precision`` (resolved)."""
    return {"bf16": "bf16", "fp16": "fp16"}.get(precision, "fp32")


def refuse_other_precision(checkpoint: Checkpoint, precision: str) -> None:
    """Refuse to resume ``checkpoint`` under a ``precision`` whose weights form differs.

    DeepSpeed's bf16 mode keeps bf16 weights beside fp32 master copies, in optimizer files of its
    own (``bf16_*``), and its fp16 mode fp16 weights with a loss scaler; loading across weight
    forms fails deep inside DeepSpeed or is untested, so it is refused here. fp32 and
    bf16-autocast keep fp32 weights in one layout, so a run started on a CPU (``auto``: fp32)
    resumes on a GPU (``auto``: bf16-autocast). Checkpoints whose manifest predates the
    precision record are told apart by the bf16 mode's file names only.

    Raises:
        ConfigError: naming the checkpoint, both precisions and the setting that resumes it.
    """
    saved = checkpoint.precision
    if saved is None:
        bf16_files = any(checkpoint.path.glob("bf16_*optim_states.pt"))
        if bf16_files == (precision == "bf16"):
            return  # fp16, fp32 and bf16-autocast share file names: nothing more to tell
        if bf16_files:
            saved, resumes = "bf16", "bf16"
        else:
            saved = "fp32, fp16 or bf16-autocast (its manifest does not say which)"
            resumes = "fp32 or bf16-autocast (fp16 if it was written in fp16)"
    elif weights_form(saved) == weights_form(precision):
        return
    else:
        resumes = saved if weights_form(saved) != "fp32" else "fp32 or bf16-autocast"
    raise ConfigError(
        f"checkpoint {checkpoint.path} was written in engine.precision {saved}, and this run's "
        f"engine.precision resolves to {precision} (auto: bf16-autocast on a GPU under ZeRO-1/2, "
        "bf16 under ZeRO-3, fp32 on a CPU). DeepSpeed keeps the weights and the optimizer's "
        "files differently in the two, so a run cannot resume across them, at this world size "
        f"or another: set engine.precision to {resumes} to resume it."
    )


def to_device(batch, device):
    """Move every tensor of a nested batch to ``device`` (strings and numbers stay)."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple) and batch and torch.is_tensor(batch[0]):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# engine.name of the pretraining config -> engine class; an engine beside DeepSpeed (e.g. PyTorch
# FSDP2) takes the same keyword options and joins here.
ENGINES = {"deepspeed": DeepSpeedEngine}


def build_engine(name: str, module: nn.Module, **options) -> DeepSpeedEngine:
    """The engine registered as ``name`` around ``module``, built with ``options``.

    Raises:
        ConfigError: for an unknown name, listing the known ones.
    """
    if name not in ENGINES:
        raise ConfigError(f"engine.name={name!r}: known engines are {sorted(ENGINES)}")
    return ENGINES[name](module, **options)
