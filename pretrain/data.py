"""Where a run's samples come from: shard folders, or the demo's synthetic shards in the cache."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from eoforge.datasets.errors import DataError
from eoforge.datasets.ingest import build_shards
from eoforge.datasets.reader import ShardStream
from eoforge.datasets.shards import list_shards
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


def resolve_shard_dirs(cfg: DataConfig) -> list[Path]:
    """The shard folders a data config names (the demo's live in the cache)."""
    if cfg.demo:
        return [demo_root() / "shards" / sensor for sensor in DEMO_SENSORS]
    return [Path(s) for s in cfg.shards]


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


def build_stream(cfg: DataConfig, shard_dirs: list[Path], seed: int) -> ShardStream:
    """The sensor-homogeneous batch stream over all shard folders."""
    urls, stats_files = [], []
    for folder in shard_dirs:
        stats = folder / "stats.json"
        if not stats.is_file():
            raise DataError(f"{folder} has no stats.json; run: eoforge data stats {folder}")
        stats_files.append(stats)
        urls.extend(list_shards(folder))
    normaliser = Normaliser.from_files(stats_files)
    return ShardStream(
        urls,
        normaliser,
        batch_size=cfg.batch_size,
        seed=seed,
        shuffle_buffer=cfg.shuffle_buffer,
        num_workers=cfg.num_workers,
    )
