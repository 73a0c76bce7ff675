"""Consolidate a run's newest ZeRO checkpoint into a release folder (models/release.py format)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from eoforge.launch.checkpoints import newest_whole, vet_pickles
from eoforge.launch.config import load_config
from eoforge.launch.distributed import import_deepspeed
from eoforge.launch.rundir import RunDir
from eoforge.models.release import finest_gsd, save_release
from eoforge.pretrain.config import PretrainConfig
from eoforge.pretrain.data import resolve_shard_dirs
from eoforge.pretrain.objectives import objective_label

ENCODER_PREFIX = "encoder."


def consolidated_encoder_state(checkpoints: Path) -> tuple[dict, int]:
    """fp32 encoder weights gathered from the newest whole ZeRO 1/2/3 checkpoint, and its step."""
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    newest = newest_whole(checkpoints, is_main=False)
    if newest is None:
        raise FileNotFoundError(
            f"no complete checkpoint in {checkpoints}; train first (eoforge pretrain)"
        )
    vet_pickles(newest.path)
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=newest.tag)
    encoder = {
        k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)
    }
    return encoder, newest.step


def band_card(shard_dirs: list[Path], clip: bool = True) -> tuple[list[dict], dict, dict, dict]:
    """Band table, per-band normalisation (``clip``: whether values were clipped to [p1, p99],
    ``data.clip_percentiles``), GSD per sensor and data summary from shard folders."""
    bands, normalisation = {}, {}
    data = {"shards": [str(d) for d in shard_dirs], "samples": 0, "sensors": {}}
    for folder in shard_dirs:
        index = json.loads((folder / "index.json").read_text())
        stats = json.loads((folder / "stats.json").read_text())
        data["samples"] += index["samples"]
        for sensor, count in index["sensors"].items():
            data["sensors"][sensor] = data["sensors"].get(sensor, 0) + count
        for row in index["bands"]:
            bands[row["band_id"]] = row
        for band_id, s in stats["bands"].items():
            normalisation[band_id] = {
                "clip": clip,
                "clip_percentiles": stats["clip_percentiles"],
                "p1": s["p1"],
                "p99": s["p99"],
                "mean": s["norm_mean"],
                "std": s["norm_std"],
                "raw_mean": s["mean"],
                "raw_std": s["std"],
            }
    return list(bands.values()), normalisation, finest_gsd(bands.values()), data


def build_release(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``out`` (default ``<run_dir>/release``) from the run's newest complete checkpoint."""
    run = RunDir(run_dir)
    if not (run.path / "config.yaml").is_file():
        raise FileNotFoundError(f"{run.path} is not an eoforge run directory (no config.yaml)")
    cfg = load_config(PretrainConfig, run.path / "config.yaml")
    state, step = consolidated_encoder_state(run.checkpoints)
    bands, normalisation, gsd, data = band_card(
        resolve_shard_dirs(cfg.data), clip=cfg.data.clip_percentiles
    )
    card = {
        "name": cfg.release.name
        or f"{cfg.model.name}-{objective_label(cfg.objective)}-{run.path.name}",
        "licence": cfg.release.licence,
        "bands": bands,
        "normalisation": normalisation,
        "gsd": gsd,
        "objective": {"label": objective_label(cfg.objective), **asdict(cfg.objective)},
        "data": data,
        "steps": step,
        "run": {"seed": cfg.seed, "global_steps": cfg.steps, "zero_stage": cfg.engine.zero_stage},
    }
    return save_release(out or run.release, state, cfg.model.name, cfg.model.kwargs, card)
