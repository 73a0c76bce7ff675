"""Where a run's samples come from: shard folders, patterns, pipe: commands or weighted mixtures of
them, or the demo's synthetic shards in the cache; plus the held-out validation stream, the data
position kept in checkpoints, and a debug record of the samples each step saw."""

from __future__ import annotations

import difflib
import os
import warnings
from functools import partial
from pathlib import Path

import torch

from eoforge.datasets.augment import AugmentConfig, augment_sample
from eoforge.datasets.errors import DataError
from eoforge.datasets.ingest import build_shards
from eoforge.datasets.reader import ShardSet, ShardStream, Transform, shard_sensor
from eoforge.datasets.shards import STATS_FILE, list_shards
from eoforge.datasets.stats import Normaliser, compute_stats
from eoforge.datasets.synthetic import write_demo_scenes
from eoforge.pretrain.config import DataConfig

DEMO_VERSION = "demo-v2"  # bump when the demo data changes
DEMO_SENSORS = ("S2L2A", "S1GRD", "ENMAP")
DEMO_SCENES = 16  # per sensor
DEMO_SCENE_SIZE = 128
DEMO_TILE = 64
DEMO_SHARD_SIZE = 16


def cache_root() -> Path:
    """$EOFORGE_CACHE, else ~/.cache/eoforge."""
    return Path(os.environ.get("EOFORGE_CACHE", Path.home() / ".cache" / "eoforge"))


def demo_root() -> Path:
    return cache_root() / DEMO_VERSION


def training_specs(cfg: DataConfig) -> list[str]:
    """Every shard spec the run trains on (data.shards, or the sets of data.mixture)."""
    return [str(s) for s in cfg.shards] + [str(s) for e in cfg.mixture for s in e["shards"]]


def spec_folder(spec: str) -> Path:
    """The folder holding a shard spec's index.json and stats.json."""
    if Path(spec).is_dir():
        return Path(spec)
    if spec.startswith("pipe:"):
        raise DataError(f"{spec!r} is a pipe: command; name its set's stats.json in data.stats")
    return Path(list_shards(spec)[0]).parent


def resolve_shard_dirs(cfg: DataConfig) -> list[Path]:
    """The folders with index.json and stats.json of the training data (the demo's live in the
    cache; with data.stats, the folders of those files)."""
    if cfg.demo:
        return [demo_root() / "shards" / sensor for sensor in DEMO_SENSORS]
    if cfg.stats:
        folders = [Path(s).parent for s in cfg.stats]
    else:
        folders = [spec_folder(s) for s in training_specs(cfg)]
    return list(dict.fromkeys(folders))


def check_shards(cfg: DataConfig, world_size: int) -> None:
    """Every shard spec of the run names shards that exist, and each rank's workers get shards:
    checked before the run folder or any process group exists (the demo's shards are made
    later; pipe: commands are not run to check them).

    Raises:
        DataError: one line naming the key (``data.shards[0]``), the spec and what fits.
    """
    if cfg.demo:
        return
    sets = [("data.shards", cfg.shards)] if cfg.shards else []
    sets += [(f"data.mixture[{i}].shards", e["shards"]) for i, e in enumerate(cfg.mixture)]
    sizes = [_largest_source(key, specs) for key, specs in sets]
    largest = None if None in sizes else max(sizes)
    for i, spec in enumerate(cfg.val_shards):
        _shards_of(f"data.val_shards[{i}]", str(spec))
    workers = max(1, cfg.num_workers)
    if largest is not None and largest < world_size * workers:
        key = "data.mixture" if cfg.mixture else "data.shards"
        raise DataError(
            f"{key}: {world_size} rank(s) x {workers} worker(s) need {world_size * workers} "
            f"shards of one sensor, the largest source has {largest}; use fewer ranks or "
            "data.num_workers, or rebuild with a smaller --shard-size"
        )


def _largest_source(key: str, specs: list) -> int | None:
    """The shard count of the largest sensor source in one shard set (as the reader splits it),
    or None when a pipe: command hides it."""
    by_sensor: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if str(spec).startswith("pipe:"):
            return None
        for url in _shards_of(f"{key}[{i}]", str(spec)):
            sensor = shard_sensor(url)
            by_sensor[sensor] = by_sensor.get(sensor, 0) + 1
    return max(by_sensor.values(), default=0)


def _shards_of(key: str, spec: str) -> list[str]:
    """The shards of ``spec``, or a DataError naming ``key``, the spec and the nearest folders."""
    if spec.startswith("pipe:"):
        return []
    path = Path(spec)
    if "{" not in spec and not path.exists():
        siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
        near = difflib.get_close_matches(path.name, siblings, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(str(path.parent / n) for n in near)}?" if near else ""
        raise DataError(f"{key}={spec!r}: no such shard folder{hint}")
    try:
        urls = list_shards(spec)
    except DataError as err:
        raise DataError(f"{key}={spec!r}: {err}") from None
    if not urls:
        raise DataError(f"{key}={spec!r}: holds no shards; run eoforge data build SRC {spec}")
    return urls


def make_demo_shards(progress: bool = True) -> None:
    """Synthetic S2 L2A, S1 GRD and EnMAP GeoTIFFs -> shards + stats, once per cache."""
    root = demo_root()
    done = root / "shards" / "complete"
    if not done.is_file():
        raw = write_demo_scenes(root / "raw", n_scenes=DEMO_SCENES, size=DEMO_SCENE_SIZE)
        with warnings.catch_warnings():
            # The synthetic scenes carry nodata patches on purpose; the per-file warnings are noise here.
            warnings.simplefilter("ignore")
            for sensor in DEMO_SENSORS:
                out = root / "shards" / sensor
                build_shards(
                    raw[sensor],
                    out,
                    sensor,
                    tile_size=DEMO_TILE,
                    shard_size=DEMO_SHARD_SIZE,
                    overwrite=True,
                    progress=progress,
                )
                compute_stats(out, progress=progress)
        done.write_text("ok\n")


def prepare_shards(cfg: DataConfig, is_main: bool) -> list[Path]:
    """Make the demo shards (main process only) and check every folder is ready to read."""
    if cfg.demo and is_main:
        make_demo_shards()
    return resolve_shard_dirs(cfg)


def build_stream(
    cfg: DataConfig, shard_dirs: list[Path], seed: int, device: torch.device | None = None
) -> ShardStream:
    """The weighted, sensor-homogeneous batch stream over the training data, normalised with the
    statistics in ``shard_dirs`` on ``device``."""
    normaliser = training_normaliser(shard_dirs, clip=cfg.clip_percentiles)
    if cfg.mixture:
        urls = [
            ShardSet([str(s) for s in e["shards"]], float(e.get("weight", 1.0)))
            for e in cfg.mixture
        ]
    else:
        urls = [str(d) for d in shard_dirs] if cfg.demo else [str(s) for s in cfg.shards]
    return ShardStream(
        urls,
        normaliser,
        batch_size=cfg.batch_size,
        seed=seed,
        shuffle_buffer=cfg.shuffle_buffer,
        num_workers=cfg.num_workers,
        sensor_weights={k: float(v) for k, v in cfg.sensor_weights.items()} or None,
        transform=augment_transform(cfg.augment),
        device=device,
        max_bad_fraction=cfg.max_bad_fraction,
    )


def build_val_stream(
    cfg: DataConfig, normaliser: Normaliser, seed: int, device: torch.device | None = None
) -> ShardStream | None:
    """The held-out stream (data.val_shards), normalised with the training statistics on
    ``device`` and not augmented; None without validation."""
    if not cfg.val_every:
        return None
    return ShardStream(
        [str(s) for s in cfg.val_shards],
        normaliser,
        batch_size=cfg.batch_size,
        seed=seed,
        shuffle_buffer=cfg.shuffle_buffer,
        device=device,
        max_bad_fraction=cfg.max_bad_fraction,
    )


def training_normaliser(shard_dirs: list[Path], clip: bool = True) -> Normaliser:
    """One normaliser over the stats.json of every training folder (``clip``: percentile
    clipping, see ``Normaliser``)."""
    stats_files = []
    for folder in shard_dirs:
        stats = folder / STATS_FILE
        if not stats.is_file():
            raise DataError(f"{folder} has no {STATS_FILE}; run: eoforge data stats {folder}")
        stats_files.append(stats)
    return Normaliser.from_files(stats_files, clip=clip)


def augment_transform(options: dict) -> Transform | None:
    """The per-sample augmentation of data.augment (AugmentConfig options), or None when empty."""
    if not options:
        return None
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    try:
        cfg = AugmentConfig(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"data.augment={options}: {err}") from err
    return partial(augment_sample, cfg=cfg)


def restore_position(stream: ShardStream, saved: list[dict] | None, rank: int) -> None:
    """Continue ``stream`` from this rank's position in a checkpoint (one entry per rank); a
    checkpoint of another world size or worker count is remapped (``remapped_state``)."""
    if not saved:
        return
    same = len(saved) == stream.state_dict()["world_size"]
    if same and saved[rank]["num_workers"] == stream.num_workers:
        stream.load_state_dict(saved[rank])
    else:
        stream.load_state_dict(stream.remapped_state(saved))


class SampleLog:
    """Debug record of the samples each step trained on: ``<folder>/samples-rank<r>.txt`` gets
    one line per step, ``step id id ...``, appended (a resumed run continues the file)."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.path = Path(folder) / f"samples-rank{rank}.txt"

    def write(self, step: int, batch: dict) -> None:
        with self.path.open("a") as f:
            f.write(" ".join([str(step), *batch["meta"]["id"]]) + "\n")
