"""Does pretraining help? Label efficiency on EuroSAT: a release pretrained on unlabelled EuroSAT
train images against random weights and a supervised model trained from scratch.

Every stage runs through eoforge's own command line, in a work folder (temporary unless ``--work``
names one):

1. The scene split (``eoforge.datasets.eurosat.scene_splits``, split seed 0, test fraction
   ``TEST_FRACTION``) is drawn over EuroSAT's ids, so a scene is in test for both forms or for
   neither. The RGB (``eurosat_rgb``, 10,000 JPEGs) and MS (``eurosat_ms_subset``, 889 13-band
   GeoTIFFs) images of every scene NOT in test are linked into staging folders; no test image of
   either form is ever read by pretraining (checked before anything trains).
2. ``eoforge data build --layout eurosat`` shards each staging folder (RGB as ``S2RGB8``, MS as
   ``S2L1C`` with B8A stored last), then ``eoforge data stats``.
3. ``eoforge pretrain`` on both shard sets with ``RECIPE`` (its sensors' share of the batches set
   by ``data.sensor_weights``); the run exports its release.
4. ``eoforge bench run`` of ``SUITE``: EuroSAT RGB and MS test scenes; training labels drawn per
   class from the train scenes (10 and 100 per class, and all), a new draw per seed; protocols
   linear and kNN; encoders ``release``, ``random_init`` (the same architecture with weights
   drawn from the seed) and ``supervised`` (that random encoder first trained with the drawn
   labels, the recipe ``SUPERVISED``). Paired rows ``release - <baseline>`` are differences on the
   same labels and test scenes, seed by seed, with 95% Student t intervals.

Gates (``GATES``): on RGB at 10 and 100 labels per class, linear and kNN of the release beat
random_init; at 10 labels per class the release's linear probe beats supervised; on MS at 10
labels per class the release's linear probe beats random_init. A gate holds when the lower end of
its paired interval is above 0. Goals: the release beats supervised at 100 labels per class.

How the recipes were chosen: on the validation split (``split=val``: validation scenes carved
from train, the test scenes never read) by ``perf/eurosat_val_recipes.py``, whose committed
output ``results/eurosat_val_recipes.md`` lists every recipe tried. The test split is scored once
per recipe, here; ``--recipe`` names the recipe (``RECIPES``), and each scored recipe's result is
committed under its name, the losing ones included.

``--smoke`` runs every stage at a tiny size (a few images per class, 3 steps, 3 seeds) to check
the pipeline.

Usage: ``python perf/label_efficiency.py [--smoke] [--recipe NAME] [--out perf/results]
[--work DIR] [--threads N] [--device D]``; writes label_efficiency[_<recipe>].json, .md and
.png. Pretraining runs on a GPU where one is present (eoforge's default); ``--device`` places
the bench.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from eoforge.datasets.eurosat import CLASS_SIZES, find_images, scene_id, scene_splits

from perf_report import machine, now, write_results
from pretraining_gain import bench, deep_merge, eoforge, model_name, pretrain

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = Path(os.environ.get("EOFORGE_SAMPLE_DATA", REPO_ROOT.parent / "shared" / "data"))
FORMS = {"rgb": "eurosat_rgb", "ms": "eurosat_ms_subset"}
TEST_FRACTION = 0.25  # about 2,470 RGB test scenes (at least 2,000 are asked for) and 207 MS
SEEDS = [0, 1, 2, 3, 4]

# The pretraining recipe chosen on the validation split (module docstring).
RECIPE = {
    "seed": 0,
    "steps": 3000,
    "log_every": 50,
    "image_every": 100000,
    "save_every": 3000,
    "keep_last": 1,
    "new_run": True,
    "data": {
        "batch_size": 128,
        "num_workers": 0,
        "shuffle_buffer": 1024,
        "clip_percentiles": True,
        "sensor_weights": {"S2RGB8": 3.0, "S2L1C": 1.0},
    },
    "model": {
        "name": "vit_tiny_patch16",
        "kwargs": {"patch_size": 16, "embed_dim": 192, "depth": 4, "num_heads": 3},
    },
    "objective": {
        "name": "instance_contrast",
        "kwargs": {"queue_size": 4096, "momentum": 0.99},
    },
    "optim": {
        "lr": 1.0e-3,
        "min_lr": 0.0,
        "weight_decay": 0.05,
        "betas": [0.9, 0.95],
        "warmup_steps": 50,
    },
    "engine": {"zero_stage": 2, "precision": "auto", "grad_clip": 1.0},
    "release": {"export": True},
}
# Recipes scored on the test split: overrides of RECIPE, each run once (module docstring).
# ``gpu_vit_small`` is for a lent GPU (issue: pretrain a ViT-S for at most 5 minutes): ViT-S at
# patch 8 (64 tokens per 64-px image), batch 256. Its step count is an estimate for about 5
# minutes on one H100, not yet measured; it has not been scored.
RECIPES = {
    "instance_contrast": {},
    # MAE learned most per CPU-minute for the linear probe on the validation split (0.558 and
    # 0.693 at 10 and 100 labels per class, against instance contrast's 0.516 and 0.668), and
    # less for kNN at 10 labels (0.478 against 0.551).
    "mae": {
        "objective": {
            "name": "mae",
            "kwargs": {"decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4},
        },
    },
    # The mae recipe again, once shards mix their samples (written in a permuted order): the
    # scores of instance_contrast and mae above read shards in class-folder order, so every batch
    # held one class (the reader shuffles within a shard only).
    "mae_mixed_shards": {
        "objective": {
            "name": "mae",
            "kwargs": {"decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4},
        },
    },
    # instance_contrast again on shards that mix their samples (as mae_mixed_shards).
    "instance_contrast_mixed_shards": {},
    "gpu_vit_small": {
        "steps": 4000,
        "save_every": 4000,
        "data": {"batch_size": 256, "num_workers": 4},
        "model": {
            "name": "vit_small_patch16",
            "kwargs": {"patch_size": 8, "embed_dim": 384, "depth": 12, "num_heads": 6},
        },
        "objective": {"kwargs": {"queue_size": 16384, "momentum": 0.99}},
    },
}
# The scored recipe the shipped config ``eurosat_best`` carries (tests keep the two equal).
BEST = "instance_contrast"
# The supervised-from-scratch baseline's training, per labels-per-class count, chosen on the
# validation split (results/eurosat_val_recipes.md).
SUPERVISED = {
    10: {"epochs": 100, "lr": 1.0e-3, "batch_size": 64, "layer_decay": 1.0},
    100: {"epochs": 30, "lr": 1.0e-3, "batch_size": 64, "layer_decay": 1.0},
}
# (entry id, form, labels per class or None for all, encoders)
ENTRIES = [
    ("rgb_10", "rgb", 10, ["release", "random_init", "supervised"]),
    ("rgb_100", "rgb", 100, ["release", "random_init", "supervised"]),
    ("rgb_all", "rgb", None, ["release", "random_init"]),
    ("ms_10", "ms", 10, ["release", "random_init", "supervised"]),
    ("ms_all", "ms", None, ["release", "random_init"]),
]
# (entry id, protocol, baseline): the paired row whose interval must lie above 0.
GATES = [
    ("rgb_10", "linear", "random_init"),
    ("rgb_10", "knn", "random_init"),
    ("rgb_100", "linear", "random_init"),
    ("rgb_100", "knn", "random_init"),
    ("rgb_10", "linear", "supervised"),
    ("ms_10", "linear", "random_init"),
]
GOALS = [("rgb_100", "linear", "supervised")]
# --smoke: images per class staged, the recipe's length, the labels drawn and the supervised epochs.
SMOKE = {"per_class": 12, "steps": 3, "labels": {10: 5, 100: 6}, "epochs": 1, "seeds": [0, 1, 2]}


def stage(work: Path, per_class: int | None) -> dict:
    """Link the images of every non-test scene of both forms into ``work/staged/<form>``.

    Returns:
        {form: {"staged", "test_scenes", "folder"}}.

    Raises:
        RuntimeError: if a staged scene is a test scene of either form (cannot happen by the
            split's rule; checked because a leak would make every number wrong).
    """
    found = {form: find_images(SAMPLE_DATA / folder, form) for form, folder in FORMS.items()}
    test = set()
    for _, _, paths in found.values():
        ids = [scene_id(p) for p in paths]
        splits = scene_splits(ids, test_fraction=TEST_FRACTION)
        test |= {i for i, s in zip(ids, splits, strict=True) if s == "test"}
    out = {}
    for form, (_, folder, paths) in found.items():
        if per_class is not None:
            paths = first_per_class(paths, per_class)
        target = work / "staged" / form
        staged = 0
        for path in paths:
            if scene_id(path) in test:
                continue
            link = target / path.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
            staged += 1
        leaked = {scene_id(p) for p in target.rglob("*.*")} & test
        if leaked:
            raise RuntimeError(f"test scenes staged for pretraining: {sorted(leaked)[:5]}")
        out[form] = {"staged": staged, "test_scenes": len(paths) - staged, "folder": str(target)}
    return out


def first_per_class(paths: list[Path], n: int) -> list[Path]:
    """The first ``n`` of ``paths`` in each class folder, in their order."""
    taken: dict[Path, int] = {}
    kept = []
    for path in paths:
        taken[path.parent] = taken.get(path.parent, 0) + 1
        if taken[path.parent] <= n:
            kept.append(path)
    return kept


def suite(smoke: bool, per_class_roots: dict[str, str]) -> dict:
    """The bench suite (module docstring); ``per_class_roots`` maps form to the dataset root."""
    labels = SMOKE["labels"] if smoke else {10: 10, 100: 100}
    datasets = []
    for entry, form, per_class, encoders in ENTRIES:
        options = {"form": form, "test_fraction": TEST_FRACTION}
        item = {"id": entry, "name": "eurosat", "root": per_class_roots[form], "encoders": encoders}
        if per_class is not None:
            options["labels_per_class"] = labels[per_class]
            training = dict(SUPERVISED[per_class])
            if smoke:
                training["epochs"] = SMOKE["epochs"]
            item["training"] = training
        datasets.append(item | {"options": options})
    return {
        "name": "eurosat_label_efficiency",
        "seeds": SMOKE["seeds"] if smoke else SEEDS,
        "datasets": datasets,
        "protocols": ["linear", "knn"],
        "encoders": ["release", "random_init", "supervised"],
    }


def paired(rows: list[dict], entry: str, protocol: str, baseline: str) -> dict:
    """The paired accuracy row ``release - baseline`` of an entry and protocol, with its verdict."""
    match = [
        r
        for r in rows
        if (r["dataset"], r["protocol"], r["encoder"], r["metric"])
        == (entry, protocol, f"release - {baseline}", "accuracy")
    ]
    if len(match) != 1:
        raise RuntimeError(f"{len(match)} rows for {entry} {protocol} release - {baseline}")
    row = match[0]
    low = row["mean"] - row["ci95"]
    return {
        "entry": entry,
        "protocol": protocol,
        "baseline": baseline,
        "mean": row["mean"],
        "ci95": row["ci95"],
        "interval": [low, row["mean"] + row["ci95"]],
        "n_seeds": row["n_seeds"],
        "holds": bool(low > 0),  # a NaN interval does not hold
    }


def plot(result: dict, path: Path) -> None:
    """Accuracy against labels per class, one line per encoder with its 95% band, one panel per
    form and protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["metric"] == "accuracy" and " - " not in r["encoder"]]
    per_class = {e: n for e, _, n, _ in ENTRIES}
    n_all = {form: result["n_train_all"][form] for form in FORMS}
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), sharey=False)
    for i, form in enumerate(FORMS):
        for j, protocol in enumerate(("linear", "knn")):
            ax = axes[i][j]
            for encoder in ("release", "random_init", "supervised"):
                points = sorted(
                    (per_class[r["dataset"]] or n_all[form], r["mean"], r["ci95"])
                    for r in rows
                    if r["dataset"].startswith(form + "_")
                    and r["protocol"] == protocol
                    and r["encoder"] == encoder
                )
                if not points:
                    continue
                xs, means, halves = zip(*points, strict=True)
                halves = [0.0 if math.isnan(h) else h for h in halves]
                ax.plot(xs, means, marker="o", label=encoder)
                ax.fill_between(
                    xs,
                    [m - h for m, h in zip(means, halves, strict=True)],
                    [m + h for m, h in zip(means, halves, strict=True)],
                    alpha=0.2,
                )
            ax.set_xscale("log")
            ax.set_title(f"EuroSAT {form.upper()}, {protocol}")
            ax.set_xlabel("training labels per class (last point: all)")
            ax.set_ylabel("test accuracy (mean ± 95% CI)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(
        "Label efficiency: " + result["recipe_name"] + (" (smoke)" if result["smoke"] else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    m, stages, pre = result["machine"], result["stages_s"], result["pretrain"]
    steps = sorted(pre["losses"], key=int)
    recipe = result["recipe"]
    lines = [
        f"# Label efficiency on EuroSAT: recipe `{result['recipe_name']}`"
        + (" (smoke)" if result["smoke"] else ""),
        "",
        f"Machine: {m['processor'] or m['machine']}, {m['cpu_count']} CPUs ({m['torch_threads']} "
        f"torch thread(s)), torch {m['torch']}, {result['date']}. Wall time "
        f"{result['wall_s']:.0f} s: "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stages.items())
        + ".",
        "",
        "Data: scene split seed 0, test fraction "
        f"{TEST_FRACTION}; pretraining read {result['staged']['rgb']['staged']} RGB and "
        f"{result['staged']['ms']['staged']} MS images of non-test scenes (no test image of "
        f"either form); test scenes: {result['n_test']['rgb']} RGB, {result['n_test']['ms']} MS.",
        "",
        f"Pretraining: {model_name(recipe)} + {recipe['objective']['name']} "
        f"{json.dumps(recipe['objective']['kwargs'])}, batch {recipe['data']['batch_size']}, "
        f"sensor weights {json.dumps(recipe['data']['sensor_weights'])}, lr "
        f"{recipe['optim']['lr']}, ZeRO-{recipe['engine']['zero_stage']}, seed {recipe['seed']}; "
        f"{pre['finished_step']} of {pre['steps']} steps; logged loss "
        f"{pre['losses'][steps[0]]:.4f} at step {steps[0]}, {pre['losses'][steps[-1]]:.4f} at "
        f"step {steps[-1]}.",
        "",
        f"Bench: seeds {result['suite']['seeds']} (each draws the training labels and seeds the "
        "probe, random weights and supervised training; the test scenes stay fixed); mean ± "
        "half-width of the 95% Student t interval over seeds. Supervised-from-scratch training: "
        + "; ".join(f"{k} labels/class {json.dumps(v)}" for k, v in SUPERVISED.items())
        + ".",
        "",
        "| entry | protocol | encoder | accuracy (mean ± 95% CI) | seeds |",
        "|---|---|---|---:|---:|",
    ]
    for r in result["rows"]:
        if r["metric"] == "accuracy":
            lines.append(
                f"| {r['dataset']} | {r['protocol']} | {r['encoder']} | "
                f"{r['mean']:.4f} ± {r['ci95']:.4f} | {r['n_seeds']} |"
            )
    lines += [
        "",
        "## Gates and goals",
        "",
        "| kind | entry | protocol | release - | paired difference | interval | holds |",
        "|---|---|---|---|---:|---|---|",
    ]
    for kind, checks in (("gate", result["gates"]), ("goal", result["goals"])):
        for g in checks:
            low, high = g["interval"]
            lines.append(
                f"| {kind} | {g['entry']} | {g['protocol']} | {g['baseline']} | "
                f"{g['mean']:+.4f} ± {g['ci95']:.4f} | [{low:+.4f}, {high:+.4f}] | "
                f"{'yes' if g['holds'] else 'NO'} |"
            )
    verdict = "every gate HOLDS" if result["gates_hold"] else "a gate DOES NOT HOLD"
    lines += ["", f"**Verdict**: {verdict}.", "", f"![label efficiency]({result['plot']})"]
    return "\n".join(lines) + "\n"


def configure(recipe_name: str) -> dict:
    """``RECIPE`` with the recipe's overrides merged in; an override naming another objective
    replaces the objective whole (its options are not the first objective's)."""
    overrides = RECIPES[recipe_name]
    recipe = deep_merge(RECIPE, overrides)
    if (
        overrides.get("objective", {}).get("name", recipe["objective"]["name"])
        != RECIPE["objective"]["name"]
    ):
        recipe["objective"] = json.loads(json.dumps(overrides["objective"]))
    return recipe


def run(work: Path, smoke: bool, recipe_name: str, device: str | None = None) -> dict:
    """Every stage in ``work``, the bench on ``device``; the result without the machine and
    date."""
    recipe = configure(recipe_name)
    if smoke:
        recipe.update(steps=SMOKE["steps"], log_every=1, save_every=SMOKE["steps"])
        recipe["data"].update(batch_size=8, num_workers=0)
        if recipe["objective"]["name"] == "instance_contrast":
            recipe["objective"]["kwargs"]["queue_size"] = 64
    log = work / "eoforge.log"
    stages = {}

    start = time.perf_counter()
    staged = stage(work, SMOKE["per_class"] if smoke else None)
    shards = []
    for form in FORMS:
        out = work / "shards" / form
        eoforge(["data", "build", staged[form]["folder"], str(out), "--layout", "eurosat"], log)
        eoforge(["data", "stats", str(out)], log)
        shards.append(out)
    stages["stage and shard"] = time.perf_counter() - start

    start = time.perf_counter()
    pretrained = pretrain(recipe, shards, work / "run", log)
    stages["pretrain"] = time.perf_counter() - start

    # Smoke runs score the staged subset (its test scenes were not staged: a folder of them).
    roots = {form: str(SAMPLE_DATA / folder) for form, folder in FORMS.items()}
    if smoke:
        roots = {form: str(_smoke_root(work, form)) for form in FORMS}
    bench_suite = suite(smoke, roots)
    start = time.perf_counter()
    results = bench(bench_suite, work / "run" / "release", work / "bench", log, device)
    stages["bench"] = time.perf_counter() - start

    by_entry = {c["dataset"]: c for c in results["cells"]}
    return {
        "recipe_name": recipe_name,
        "recipe": recipe,
        "supervised": {str(k): v for k, v in SUPERVISED.items()},
        "suite": bench_suite,
        "staged": staged,
        "n_test": {form: by_entry[f"{form}_all"]["n_test"] for form in FORMS},
        # Labels per class, on average, when all are used (the curve's last point).
        "n_train_all": {
            form: by_entry[f"{form}_all"]["n_train"] / len(CLASS_SIZES) for form in FORMS
        },
        "pretrain": pretrained,
        "stages_s": stages,
        "cells": results["cells"],
        "rows": results["rows"],
        "gates": [paired(results["rows"], *g) for g in GATES],
        "goals": [paired(results["rows"], *g) for g in GOALS],
    }


def _smoke_root(work: Path, form: str) -> Path:
    """The smoke run's scored images: the first ``SMOKE["per_class"]`` of each class, linked."""
    _, folder, paths = find_images(SAMPLE_DATA / FORMS[form], form)
    root = work / "smoke_scored" / form
    for path in first_per_class(paths, SMOKE["per_class"]):
        link = root / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path.resolve())
    return root


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, the same stages")
    parser.add_argument("--recipe", choices=list(RECIPES), default=next(iter(RECIPES)))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--work", type=Path, help="keep the shards, run and bench here")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", help="where the bench runs (default: CUDA when present)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.work:
        args.work.mkdir(parents=True, exist_ok=False)
        measured = run(args.work.resolve(), args.smoke, args.recipe, args.device)
    else:
        with tempfile.TemporaryDirectory(prefix="label_efficiency-") as work:
            measured = run(Path(work), args.smoke, args.recipe, args.device)
    name = "label_efficiency" + ("" if args.recipe == next(iter(RECIPES)) else f"_{args.recipe}")
    if args.smoke:
        name += "_smoke"
    result = {
        "benchmark": "label_efficiency",
        "smoke": args.smoke,
        "date": now(),
        "machine": machine(args.threads),
        "wall_s": time.perf_counter() - start,
        **measured,
        "plot": f"{name}.png",
    }
    result["gates_hold"] = all(g["holds"] for g in result["gates"])
    args.out.mkdir(parents=True, exist_ok=True)
    plot(result, args.out / result["plot"])
    write_results(args.out, name, result, markdown)
    return result


if __name__ == "__main__":
    main()
