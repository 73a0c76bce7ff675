"""Does pretraining help? Linear-probe accuracy of a pretrained release against its random-init
encoder on Indian Pines' spatially blocked split.

The whole pipeline runs in a work folder (temporary unless ``--work`` names one), every stage
through eoforge's own command line, called in this process:

1. Indian Pines (``Indian_pines_corrected.npy`` of ``../shared/data/indian_pines_aviris``,
   145 x 145 x 200 uint16) is written as a 200-band uint16 GeoTIFF (EPSG:32616, 20 m pixels) and
   ingested as sensor ``AVIRIS`` in 16-px tiles, 32 per shard (``eoforge data build``; 81 tiles),
   then ``eoforge data stats``.
2. The 2 real EnMAP L2A patches of ``../shared/data/hyspecnet11k_enmap`` are ingested the same
   way as sensor ``ENMAP`` (``--pattern '*SPECTRAL_IMAGE.TIF'``; 128 tiles), then stats.
3. ``eoforge pretrain`` on both shard sets with the fixed recipe ``RECIPE``: ``vit_test_patch8``,
   MAE with a 64-wide, 2-deep decoder (4 heads), ``norm_pix`` off, batch 8, 300 steps, lr 1e-3
   (AdamW, weight decay 0.05, betas 0.9/0.95, cosine to 0 after 5 warmup steps), ZeRO-2 in the
   precision eoforge's ``auto`` picks (fp32 on a CPU), gradient clip 1.0, seed 0; the release
   is exported into ``run/release``. The recipe is the measurement's definition: it is not
   tuned here.
4. ``eoforge bench run`` of the suite ``pines``: Indian Pines, window 16, at most 800 training
   and 800 test pixels of the spatially blocked split, seeds 0-2, protocols ``linear`` and
   ``knn``, encoders ``release`` and ``random_init`` (the same architecture with random weights
   drawn from the seed). The harness adds the paired rows ``release - random_init``: per seed
   the difference of the two scores on the same split, mean and half-width of its 95% Student t
   interval over the seeds.

Criterion: pretraining helps iff the lower end of the paired
``release - random_init`` linear-probe accuracy interval is above 0 (mean - half-width > 0).
The verdict is reported as measured, holds or not. Pretraining, probes and random weights are
seeded, and the reader's shuffles do not depend on where the shards lie: a second run on the
same machine and thread count (``--threads``, default 1) gives the same numbers.

``--smoke`` runs the same stages at a tiny size (3 pretraining steps, 48 + 48 probe pixels, the
3 seeds the harness requires) to check the pipeline, in well under a minute.

``--variant NAME`` runs the same pipeline with one entry of ``VARIANTS`` applied: ``patch4``
(patch 4: 16 patches per 16-px tile, 4 of them visible at mask 0.75), ``mask50`` (mask ratio 0.5
at patch 8: 2 of 4 patches visible) or ``tile32`` (32-px tiles at ingest: 16 patches of 8 px, 4
visible; the bench's window stays 16). With the default recipe the encoder sees one of a tile's 4
patches, which may make the pretext task nearly trivial; the variants show how the gain behaves
when it sees more. ``tile32`` also changes the data: 24 Indian Pines tiles instead of 81 (8 of
them about half padding, the edge strips 16-px tiles drop) and 32 EnMAP tiles instead of 128,
each with 4x the pixels. The variants are information for choosing a recipe, each run once, not
a tuning of the measurement: the criterion, suite and probe are the same, and the measurement
itself is the run without ``--variant``.

Usage: ``python perf/pretraining_gain.py [--smoke] [--variant NAME] [--out perf/results]
[--work DIR]``; writes pretraining_gain.json and .md into --out, or
pretraining_gain_<variant>.json and .md with ``--variant``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
import yaml
from rasterio.transform import from_origin

from eoforge.finetune.bench import grid_edge_cells
from eoforge.launch import cli

from perf_report import machine, now, write_results

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = Path(os.environ.get("EOFORGE_SAMPLE_DATA", REPO_ROOT.parent / "shared" / "data"))
INDIAN_PINES = "indian_pines_aviris"
ENMAP = "hyspecnet11k_enmap"
TILE, SHARD_SIZE = 16, 32

# The pretraining recipe (the config of the measurement, module docstring); the work folder's
# shard sets and run folder are added to it.
RECIPE = {
    "seed": 0,
    "steps": 300,
    "log_every": 50,
    "image_every": 1000,
    "save_every": 300,
    "keep_last": 3,
    "new_run": True,
    "data": {
        "batch_size": 8,
        "num_workers": 0,
        "shuffle_buffer": 256,
        "clip_percentiles": True,
    },
    "model": {"name": "vit_test_patch8", "kwargs": {}},
    "objective": {
        "name": "mae",
        "kwargs": {"decoder_dim": 64, "decoder_depth": 2, "decoder_heads": 4, "norm_pix": False},
    },
    "optim": {
        "lr": 1.0e-3,
        "min_lr": 0.0,
        "weight_decay": 0.05,
        "betas": [0.9, 0.95],
        "warmup_steps": 5,
    },
    "engine": {"zero_stage": 2, "precision": "auto", "grad_clip": 1.0},
    "release": {"export": True},
}
# The benchmark suite; ``root`` is filled in from the sample data.
SUITE = {
    "name": "pines",
    "seeds": [0, 1, 2],
    "datasets": [
        {"name": "indian_pines", "options": {"window": 16, "max_train": 800, "max_test": 800}}
    ],
    "protocols": ["linear", "knn"],
    "encoders": ["release", "random_init"],
}
# Pre-declared recipe variants (module docstring): deep-merged overrides of RECIPE ("recipe")
# and/or the ingest tile side ("tile"); "why" says what each changes and why, and is stored in
# the result.
VARIANTS = {
    "patch4": {
        "why": "patch 4 instead of 8: a 16-px tile has 16 patches, so at mask 0.75 the encoder "
        "sees 4 of them instead of 1",
        "recipe": {"model": {"kwargs": {"patch_size": 4}}},
    },
    "mask50": {
        "why": "MAE mask ratio 0.5 instead of 0.75 at patch 8: the encoder sees 2 of a tile's 4 "
        "patches instead of 1",
        "recipe": {"objective": {"kwargs": {"mask_ratio": 0.5}}},
    },
    "tile32": {
        "why": "32-px tiles at ingest instead of 16: at patch 8 a tile has 16 patches, so at mask "
        "0.75 the encoder sees 4 of them instead of 1; the bench's window stays 16",
        "tile": 32,
    },
}
# --smoke: the recipe's length and the probe's sample counts only.
SMOKE = {"steps": 3, "log_every": 1, "save_every": 3, "max_train": 48, "max_test": 48}
PAIRED = "release - random_init"


def deep_merge(base: dict, overrides: dict) -> dict:
    """A copy of ``base`` with ``overrides`` merged in, nested dicts key by key."""
    merged = json.loads(json.dumps(base))
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = json.loads(json.dumps(value))
    return merged


def flat(overrides: dict, prefix: str = "") -> dict:
    """{"a.b.c": value} for every leaf of nested ``overrides``."""
    leaves = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            leaves |= flat(value, f"{prefix}{key}.")
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def configure(variant: str | None) -> tuple[dict, int]:
    """The recipe (a fresh copy) and the ingest tile side of ``variant``; None for the default.

    Raises:
        ValueError: naming the variants, where ``variant`` is not one of them.
    """
    if variant is None:
        return json.loads(json.dumps(RECIPE)), TILE
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; the variants are {', '.join(VARIANTS)}")
    entry = VARIANTS[variant]
    return deep_merge(RECIPE, entry.get("recipe", {})), entry.get("tile", TILE)


def eoforge(args: list[str], log: Path) -> None:
    """Run ``eoforge ARGS`` in this process, its standard output appended to ``log``.

    Raises:
        RuntimeError: naming the command, where it exits non-zero (its error is on stderr).
    """
    with open(log, "a") as f, contextlib.redirect_stdout(f):
        code = cli.main(args)
    if code:
        raise RuntimeError(f"eoforge {' '.join(args)} failed with exit code {code}; see {log}")


def write_indian_pines_tif(root: Path, out: Path) -> Path:
    """Indian Pines' corrected cube as a 200-band uint16 GeoTIFF (EPSG:32616, 20 m pixels).

    The scene ships as a bare array; a projected grid at AVIRIS's 20 m pixel makes it a scene
    ``eoforge data build`` ingests like any other.
    """
    path = root / INDIAN_PINES / "Indian_pines_corrected.npy"
    if not path.is_file():
        raise SystemExit(f"{path} not found; set EOFORGE_SAMPLE_DATA to the sample data")
    cube = np.load(path)  # [H, W, C] uint16
    out.mkdir(parents=True)
    tif = out / "indian_pines.tif"
    height, width, bands = cube.shape
    with rasterio.open(
        tif, "w", driver="GTiff", width=width, height=height, count=bands, dtype="uint16",
        crs="EPSG:32616", transform=from_origin(500000, 4500000, 20, 20),
    ) as ds:  # fmt: skip
        ds.write(cube.transpose(2, 0, 1))  # [C, H, W]
    return tif


def ingest(
    src: Path, out: Path, sensor: str, log: Path, pattern: str | None = None, tile: int = TILE
) -> dict:
    """``eoforge data build`` in ``tile``-px tiles + ``eoforge data stats`` of one source; its
    index's counts."""
    args = ["data", "build", str(src), str(out), "--sensor", sensor]
    args += ["--tile-size", str(tile), "--shard-size", str(SHARD_SIZE)]
    eoforge(args + (["--pattern", pattern] if pattern else []), log)
    eoforge(["data", "stats", str(out)], log)
    index = json.loads((out / "index.json").read_text())
    return {"samples": index["samples"], "sensors": index["sensors"], "bands": len(index["bands"])}


def pretrain(recipe: dict, shards: list[Path], run_dir: Path, log: Path) -> dict:
    """``eoforge pretrain`` with ``recipe`` on ``shards`` in ``run_dir``; the steps it finished
    and its losses."""
    config = {**recipe, "run_dir": str(run_dir)}
    config["data"] = {**recipe["data"], "shards": [str(s) for s in shards]}
    path = run_dir.parent / "recipe.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    eoforge(["pretrain", "--config", str(path)], log)
    finished = json.loads((run_dir / "finished.json").read_text())
    return {
        "steps": recipe["steps"],
        "finished_step": finished["step"],
        "losses": logged_losses(run_dir),
        "release": (run_dir / "release" / "model.safetensors").is_file(),
    }


def logged_losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} as the run logged it to TensorBoard: the mean loss since the previous log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars("loss")}


def bench(suite: dict, release: Path, out: Path, log: Path, device: str | None = None) -> dict:
    """``eoforge bench run`` of ``suite`` on ``release`` (on ``device``, default the bench's:
    CUDA when present); its results.json."""
    path = out.parent / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    args = ["bench", "run", str(path), "--release", str(release), "--out", str(out)]
    eoforge(args + (["--device", device] if device else []), log)
    return json.loads((out / "results.json").read_text())


def verdict(rows: list[dict]) -> dict:
    """The criterion on the paired linear-probe accuracy row (module docstring)."""
    matches = [
        r
        for r in rows
        if (r["protocol"], r["encoder"], r["metric"]) == ("linear", PAIRED, "accuracy")
    ]
    if len(matches) != 1:
        raise RuntimeError(f"the bench gave {len(matches)} paired linear accuracy rows, not 1")
    row = matches[0]
    low, high = row["mean"] - row["ci95"], row["mean"] + row["ci95"]
    return {
        "mean": row["mean"],
        "ci95": row["ci95"],
        "interval": [low, high],
        "n_seeds": row["n_seeds"],
        "holds": bool(low > 0),  # a NaN interval (one seed) does not hold
    }


def model_name(recipe: dict) -> str:
    """The recipe's model, with its constructor overrides where it has any."""
    model = recipe["model"]
    overrides = ", ".join(f"{k}={v}" for k, v in model["kwargs"].items())
    return model["name"] + (f" ({overrides})" if overrides else "")


def markdown(result: dict) -> str:
    m, stages, pre, v = result["machine"], result["stages_s"], result["pretrain"], result["verdict"]
    data, suite = result["data"], result["suite"]
    options = suite["datasets"][0]["options"]
    steps = sorted(pre["losses"], key=int)
    first, last = steps[0], steps[-1]
    variant = result.get("variant")
    tile = variant["tile"] if variant else TILE
    lines = [
        "# Does pretraining help? Indian Pines linear probe, release vs random init"
        + (f", variant {variant['name']}" if variant else "")
        + (" (smoke)" if result["smoke"] else ""),
        "",
    ]
    if variant:
        changes = [f"`{key} = {value}`" for key, value in flat(variant["recipe"]).items()]
        if variant["tile"] != TILE:
            changes.append(f"tiles of {variant['tile']} px at ingest instead of {TILE}")
        lines += [
            f"Variant `{variant['name']}`, information for choosing a recipe (fixed in advance, "
            "run once; not the measurement, which is the default recipe): "
            f"{variant['why']}. Changes against the default recipe: " + "; ".join(changes) + ".",
            "",
        ]
    lines += [
        f"Machine: {m['processor'] or m['machine']}, {m['cpu_count']} CPUs ({m['torch_threads']} "
        f"torch thread(s)), torch {m['torch']}, {result['date']}. Wall time "
        f"{result['wall_s']:.0f} s: "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stages.items())
        + ".",
        "",
        f"Data: Indian Pines as a GeoTIFF, {data['indian_pines']['samples']} tiles of {tile} px "
        f"({data['indian_pines']['bands']} AVIRIS bands); EnMAP, {data['enmap']['samples']} tiles "
        f"({data['enmap']['bands']} bands). Pretraining: {model_name(result['recipe'])} + "
        f"MAE, batch {result['recipe']['data']['batch_size']}, lr {result['recipe']['optim']['lr']}"
        f", ZeRO-{result['recipe']['engine']['zero_stage']}, seed {result['recipe']['seed']}; "
        f"{pre['finished_step']} of {pre['steps']} steps; logged loss (mean since the previous "
        f"log) {pre['losses'][first]:.4f} at step {first}, {pre['losses'][last]:.4f} at step "
        f"{last}.",
        "",
        f"Bench: window {options['window']}, at most {options['max_train']} training and "
        f"{options['max_test']} test pixels of the spatially blocked split, seeds "
        f"{suite['seeds']}; mean ± half-width of the 95% Student t interval over seeds. Rows "
        f"`{PAIRED}` are paired differences on the same splits.",
        "",
        "| protocol | encoder | metric | mean ± 95% CI | seeds |",
        "|---|---|---|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['protocol']} | {r['encoder']} | {r['metric']} | "
            f"{r['mean']:.4f} ± {r['ci95']:.4f} | {r['n_seeds']} |"
        )
    edge, linear = grid_edge_cells(result["cells"])
    if edge:
        lines += [
            "",
            f"In {edge} of {linear} linear-probe cells the selected learning rate is the "
            "grid's largest or smallest (`eoforge.finetune.linear.DEFAULT_LRS`): the probe, not "
            "only the encoders, may limit these accuracies.",
        ]
    low, high = v["interval"]
    if v["holds"]:
        sentence = "pretraining helps: the interval lies above 0. HOLDS."
    else:
        sentence = (
            "the interval does not lie above 0, so pretraining is not shown to help. DOES NOT HOLD."
        )
    lines += [
        "",
        f"**Verdict**: paired linear-probe accuracy `{PAIRED}` {v['mean']:+.4f} ± {v['ci95']:.4f} "
        f"over {v['n_seeds']} seeds, interval [{low:+.4f}, {high:+.4f}]: {sentence}",
    ]
    return "\n".join(lines) + "\n"


def run(work: Path, smoke: bool, variant: str | None = None) -> dict:
    """Every stage in ``work``, with ``variant``'s recipe and tile (None: the default); the
    result without the machine and date."""
    recipe, tile = configure(variant)
    suite = json.loads(json.dumps(SUITE))
    options = suite["datasets"][0]["options"]
    if smoke:
        recipe.update({k: SMOKE[k] for k in ("steps", "log_every", "save_every")})
        options.update({k: SMOKE[k] for k in ("max_train", "max_test")})
    suite["datasets"][0]["root"] = str((SAMPLE_DATA / INDIAN_PINES).resolve())
    log = work / "eoforge.log"
    stages, data = {}, {}

    start = time.perf_counter()
    tif = write_indian_pines_tif(SAMPLE_DATA, work / "indian_pines_tif")
    shards = [work / "shards" / "indian_pines", work / "shards" / "enmap"]
    data["indian_pines"] = ingest(tif.parent, shards[0], "AVIRIS", log, tile=tile)
    stages["ingest Indian Pines"] = time.perf_counter() - start

    start = time.perf_counter()
    pattern = "*SPECTRAL_IMAGE.TIF"
    data["enmap"] = ingest(SAMPLE_DATA / ENMAP, shards[1], "ENMAP", log, pattern, tile)
    stages["ingest EnMAP"] = time.perf_counter() - start

    start = time.perf_counter()
    pretrained = pretrain(recipe, shards, work / "run", log)
    stages["pretrain"] = time.perf_counter() - start

    start = time.perf_counter()
    results = bench(suite, work / "run" / "release", work / "bench", log)
    stages["bench"] = time.perf_counter() - start

    return {
        "recipe": recipe,
        "suite": suite,
        "data": data,
        "pretrain": pretrained,
        "stages_s": stages,
        "cells": results["cells"],
        "rows": results["rows"],
        "verdict": verdict(results["rows"]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, the same stages")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--work", type=Path, help="keep the shards, run and bench here")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--variant", choices=list(VARIANTS), help="a pre-declared recipe variant (VARIANTS)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.work:
        args.work.mkdir(parents=True, exist_ok=False)
        measured = run(args.work.resolve(), args.smoke, args.variant)
    else:
        with tempfile.TemporaryDirectory(prefix="pretraining_gain-") as work:
            measured = run(Path(work), args.smoke, args.variant)
    result = {
        "benchmark": "pretraining_gain",
        "smoke": args.smoke,
        "date": now(),
        "machine": machine(args.threads),
        "wall_s": time.perf_counter() - start,
        **measured,
    }
    name = "pretraining_gain"
    if args.variant:
        entry = VARIANTS[args.variant]
        result["variant"] = {
            "name": args.variant,
            "why": entry["why"],
            "recipe": entry.get("recipe", {}),
            "tile": configure(args.variant)[1],
        }
        name += f"_{args.variant}"
    write_results(args.out, name, result, markdown)
    return result


if __name__ == "__main__":
    main()
