"""Typed configuration of a pretraining run (OmegaConf structured config).

A run is ``--config file.yaml`` (or the name of a config shipped in ``pretrain/configs``) plus
``key=value`` overrides; unknown keys and wrong types are errors. The merged config is saved as
``config.yaml`` in the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    """Where samples come from and how they are batched."""

    shards: list[str] = field(
        default_factory=list
    )  # shard folders (each with index.json, stats.json)
    batch_size: int = 8  # micro-batch per rank
    num_workers: int = 0
    shuffle_buffer: int = 256
    demo: bool = False  # make synthetic S2/S1/EnMAP shards in the cache and train on them


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
    """AdamW with linear warmup and cosine decay; lr = blr * global_batch / 256 unless lr is set."""

    blr: float = 1.5e-4
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 10


@dataclass
class EngineConfig:
    zero_stage: int = 2  # 1, 2 or 3
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32
    grad_clip: float = 1.0


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
        if self.engine.zero_stage not in (1, 2, 3):
            raise ValueError(f"engine.zero_stage={self.engine.zero_stage}: must be 1, 2 or 3")
        if self.engine.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(
                f"engine.precision={self.engine.precision!r}: use auto, bf16, fp16 or fp32"
            )
        if not self.data.demo and not self.data.shards:
            raise ValueError("data.shards is empty: name shard folders (or set data.demo=true)")
        for key in ("steps", "log_every", "image_every", "save_every", "keep_last"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)}: must be >= 1")
        if self.data.batch_size < 1:
            raise ValueError(f"data.batch_size={self.data.batch_size}: must be >= 1")


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
