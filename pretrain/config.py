"""Typed configuration of a pretraining run (OmegaConf structured config).

A run is ``--config file.yaml`` (or the name of a config shipped in ``pretrain/configs``) plus
``key=value`` overrides; unknown keys and wrong types are errors. The merged config is saved as
``config.yaml`` in the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_WARMUP_STEPS = 10


@dataclass
class DataConfig:
    """Where samples come from and how they are batched (see ``eoforge.datasets.reader``)."""

    # Shard folders (each with index.json, stats.json), brace patterns or pipe: commands.
    shards: list[str] = field(default_factory=list)
    # stats.json files whose folders also hold the sets' index.json; needed for pipe: shards
    # (default: the folder of each shard spec).
    stats: list[str] = field(default_factory=list)
    # Instead of shards: shard sets sampled by weight, each {shards: [...], weight: float}.
    mixture: list = field(default_factory=list)
    sensor_weights: dict = field(default_factory=dict)  # {sensor: weight}; default sample counts
    augment: dict = field(default_factory=dict)  # datasets.augment.AugmentConfig options; {} = off
    clip_percentiles: bool = True  # clip each band to its [p1, p99] before scaling (SPECS T1)
    batch_size: int = 8  # micro-batch per rank
    num_workers: int = 0
    shuffle_buffer: int = 256
    demo: bool = False  # make synthetic S2/S1/EnMAP shards in the cache and train on them
    val_shards: list[str] = field(default_factory=list)  # held-out shard set
    val_every: int = 0  # steps between validation losses (0: no validation)
    val_batches: int = 4  # validation batches per rank
    log_ids: bool = False  # debug: append each step's sample ids to logs/samples-rank<r>.txt
    # Bad samples (undecodable, wrong band count, NaN/Inf, all nodata; truncated shards) are
    # skipped, counted and logged; more than this fraction of the samples a rank read stops the
    # run (from the 1/max_bad_fraction-th sample on; 0: the first bad sample stops it).
    max_bad_fraction: float = 0.01

    def validate(self) -> None:
        """Impossible data settings fail here, naming the key."""
        if not self.demo and bool(self.shards) == bool(self.mixture):
            raise ValueError(
                "name shard folders in data.shards, or weighted shard sets in data.mixture "
                "(one of the two), or set data.demo=true"
            )
        for i, entry in enumerate(self.mixture):
            if (
                not isinstance(entry, dict)
                or not entry.get("shards")
                or set(entry)
                - {
                    "shards",
                    "weight",
                }
            ):
                raise ValueError(
                    f"data.mixture[{i}]={entry}: each entry is {{shards: [...], weight: w}}"
                )
            if not float(entry.get("weight", 1.0)) > 0:
                raise ValueError(f"data.mixture[{i}].weight={entry['weight']}: must be > 0")
        for sensor, weight in self.sensor_weights.items():
            if not float(weight) >= 0:
                raise ValueError(f"data.sensor_weights.{sensor}={weight}: must be >= 0")
        specs = [*self.shards, *(s for e in self.mixture for s in e["shards"])]
        if any(str(s).startswith("pipe:") for s in specs) and not self.stats:
            raise ValueError(
                "data.shards holds pipe: commands: name their stats.json files in data.stats"
            )
        for key in ("batch_size", "shuffle_buffer", "val_batches"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key}={getattr(self, key)}: must be >= 1")
        if self.num_workers < 0 or self.val_every < 0:
            raise ValueError("data.num_workers and data.val_every must be >= 0")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(
                f"data.max_bad_fraction={self.max_bad_fraction}: must be between 0 and 1"
            )
        if bool(self.val_shards) != (self.val_every > 0):
            raise ValueError(
                f"data.val_shards={self.val_shards} with data.val_every={self.val_every}: set both "
                "(a held-out shard set and how often to score it) or neither"
            )


@dataclass
class ModelConfig:
    name: str = "vit_test_patch8"
    kwargs: dict = field(default_factory=dict)


@dataclass
class ObjectiveConfig:
    """One objective (``name`` + its constructor options ``kwargs``), or a weighted sum of
    ``terms``, each ``{name, weight, kwargs}``, over one shared encoder (pretrain/objectives.py).
    A term naming ``name`` without kwargs of its own uses ``kwargs``."""

    name: str = "mae"
    kwargs: dict = field(default_factory=dict)
    terms: list = field(default_factory=list)


@dataclass
class OptimConfig:
    """AdamW or SGD with momentum, linear warmup and cosine decay; lr = blr * global_batch / 256
    unless lr is set."""

    # adamw (with betas) or sgd (with momentum: MoCo-v2's and SeCo's optimiser).
    name: str = "adamw"

    # Samples per optimizer step over all ranks; None: data.batch_size x world size. A multiple
    # of that is reached by accumulating gradients over global_batch / (batch_size x world size)
    # micro-batches.
    global_batch: int | None = None
    blr: float = 1.5e-4
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    momentum: float = 0.9  # sgd only
    # Linear warm-up, in steps or as a fraction of the run (where a paper states it in epochs of
    # its run); one of the two. Neither: DEFAULT_WARMUP_STEPS.
    warmup_steps: int | None = None
    warmup_fraction: float | None = None

    def warmup(self, steps: int) -> int:
        """Warm-up steps of a run of ``steps`` optimizer steps."""
        if self.warmup_fraction is not None:
            return round(self.warmup_fraction * steps)
        return DEFAULT_WARMUP_STEPS if self.warmup_steps is None else self.warmup_steps

    def validate(self) -> None:
        """Warm-up stated once, and within range."""
        if self.warmup_steps is not None and self.warmup_fraction is not None:
            raise ValueError(
                f"optim.warmup_steps={self.warmup_steps} and optim.warmup_fraction="
                f"{self.warmup_fraction}: set one of the two (optim.warmup_steps=null to keep "
                "the fraction)"
            )
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"optim.warmup_fraction={self.warmup_fraction}: must be in [0, 1)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps}: must be >= 0")


@dataclass
class EngineConfig:
    # The engine class (eoforge.launch.engine.ENGINES); the options below are its own.
    name: str = "deepspeed"
    zero_stage: int = 2  # 1, 2 or 3
    # auto (GPU: bf16-autocast under ZeRO-1/2, bf16 under ZeRO-3; CPU: fp32), bf16 (DeepSpeed's
    # bf16 weights with fp32 master copies), fp16, fp32, or bf16-autocast (fp32 weights, bf16
    # compute under torch.autocast); eoforge.launch.engine.resolve_precision says why.
    precision: str = "auto"
    grad_clip: float = 1.0
    # A micro-batch whose loss is NaN/Inf (on any rank) is skipped and counted; this many in a
    # row save a checkpoint and stop the run.
    nonfinite_limit: int = 5
    # torch.compile the objective inside DeepSpeed: 9-24% faster per step on an H100 in
    # DeepSpeed's bf16 mode (perf/results/gpu_h100), at the price of a compilation at start-up
    # and whenever the batch's shapes change (another sensor, band count or crop size).
    # Objectives whose token counts change during training (selective_mae's phases) recompile
    # at each change.
    compile: bool = False


@dataclass
class ReleaseConfig:
    export: bool = True  # write a release into <run_dir>/release at the end
    name: str = ""
    licence: str = "CC-BY-4.0"


@dataclass
class PretrainConfig:
    run_dir: str = "runs/demo"
    seed: int = 0
    steps: int = 100
    log_every: int = 10
    image_every: int = 50
    save_every: int = 50
    keep_last: int = 3
    stop_at: int | None = None  # save and exit cleanly at this step (resume continues)
    new_run: bool = False  # start afresh even if run_dir holds a finished or partial run
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)

    def validate(self, world_size: int = 1) -> None:
        """Impossible combinations fail here, before any process group starts, naming the key."""
        # Imports torch: only when a run is checked.
        from eoforge.launch.engine import ENGINES, OPTIMIZERS

        if self.engine.name not in ENGINES:
            raise ValueError(
                f"engine.name={self.engine.name!r}: known engines are {sorted(ENGINES)}"
            )
        if self.optim.name not in OPTIMIZERS:
            raise ValueError(
                f"optim.name={self.optim.name!r}: known optimizers are {list(OPTIMIZERS)}"
            )
        self.optim.validate()
        if not 0 <= self.optim.momentum < 1:
            raise ValueError(f"optim.momentum={self.optim.momentum}: must be in [0, 1)")
        if self.engine.zero_stage not in (1, 2, 3):
            raise ValueError(f"engine.zero_stage={self.engine.zero_stage}: must be 1, 2 or 3")
        if self.engine.precision not in ("auto", "bf16", "fp16", "fp32", "bf16-autocast"):
            raise ValueError(
                f"engine.precision={self.engine.precision!r}: use auto, bf16, fp16, fp32 or "
                "bf16-autocast"
            )
        if self.engine.nonfinite_limit < 1:
            raise ValueError(f"engine.nonfinite_limit={self.engine.nonfinite_limit}: must be >= 1")
        self.data.validate()
        for key in ("steps", "log_every", "image_every", "save_every", "keep_last"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)}: must be >= 1")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ValueError(f"stop_at={self.stop_at}: must lie in 1..steps ({self.steps})")
        if self.optim.lr is not None and self.optim.min_lr > self.optim.lr:
            raise ValueError(
                f"optim.min_lr={self.optim.min_lr} is above optim.lr={self.optim.lr}: the "
                "schedule would rise as it decays"
            )
        self.accumulation(world_size)

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step for ``world_size`` ranks (from optim.global_batch)."""
        per_step = self.data.batch_size * world_size
        global_batch = self.optim.global_batch or per_step
        if global_batch < 1 or global_batch % per_step:
            raise ValueError(
                f"optim.global_batch={global_batch} is not a multiple of data.batch_size "
                f"({self.data.batch_size}) x world size ({world_size}) = {per_step}; set it to a "
                "multiple, or change data.batch_size or the number of ranks"
            )
        return global_batch // per_step

    def global_batch(self, world_size: int) -> int:
        """Samples per optimizer step over ``world_size`` ranks."""
        return self.data.batch_size * world_size * self.accumulation(world_size)


def find_config(name_or_path: str) -> Path:
    """A config file path, or the name of one shipped in pretrain/configs (``demo``, ``mae``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(
        f"config {name_or_path!r} is neither a file nor a shipped config ({names})"
    )
