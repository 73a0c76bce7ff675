"""perf/pretraining_gain.py: the verdict's criterion, the pre-declared recipe variants, and the
whole pipeline at smoke size (GeoTIFF -> shards -> pretraining -> bench) on the real Indian Pines
and EnMAP samples."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eoforge.models import create_model
from eoforge.pretrain.mae import random_masking
from eoforge.pretrain.objectives import check_kwargs, objective_class

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "perf" / "pretraining_gain.py"
spec = importlib.util.spec_from_file_location("pretraining_gain", SCRIPT)
gain = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gain)


def paired_row(mean: float, ci95: float, protocol: str = "linear") -> dict:
    return {
        "protocol": protocol,
        "encoder": gain.PAIRED,
        "metric": "accuracy",
        "mean": mean,
        "ci95": ci95,
        "n_seeds": 3,
    }


def test_verdict_needs_the_whole_interval_above_zero():
    knn = paired_row(-0.5, 0.1, protocol="knn")  # the kNN row never decides
    assert gain.verdict([paired_row(0.05, 0.04), knn])["holds"]
    assert not gain.verdict([paired_row(0.05, 0.05), knn])["holds"]  # touches 0
    assert not gain.verdict([paired_row(0.0225, 0.2477)])["holds"]
    assert not gain.verdict([paired_row(0.3, math.nan)])["holds"]  # no spread: no interval
    low, high = gain.verdict([paired_row(0.1, 0.25)])["interval"]
    assert low == pytest.approx(-0.15) and high == pytest.approx(0.35)
    with pytest.raises(RuntimeError, match="paired linear"):
        gain.verdict([knn])


def visible_patches(recipe: dict, tile: int) -> tuple[int, int]:
    """(patches per tile, patches the MAE encoder sees) for ``recipe`` on a ``tile``-px tile,
    from the model and objective the recipe builds."""
    objective = recipe["objective"]
    check_kwargs(objective["name"], objective["kwargs"], "objective.kwargs")
    encoder = create_model(recipe["model"]["name"], **recipe["model"]["kwargs"])
    mae = objective_class(objective["name"])(encoder, **objective["kwargs"])
    rows, cols = encoder.grid(torch.zeros(1, 3, tile, tile))
    keep, _ = random_masking(1, rows * cols, mae.mask_ratio, "cpu")  # [1, K]
    return rows * cols, keep.shape[1]


def test_default_recipe_shows_the_encoder_one_of_four_patches():
    recipe, tile = gain.configure(None)
    assert recipe == gain.RECIPE and recipe is not gain.RECIPE and tile == gain.TILE == 16
    assert visible_patches(recipe, tile) == (4, 1)


@pytest.mark.parametrize(
    "variant, changed, tile, patches",
    [
        ("patch4", {"model": {**gain.RECIPE["model"], "kwargs": {"patch_size": 4}}}, 16, (16, 4)),
        ("mask50", {"objective": {**gain.RECIPE["objective"], "kwargs": {
            **gain.RECIPE["objective"]["kwargs"], "mask_ratio": 0.5}}}, 16, (4, 2)),
        ("tile32", {}, 32, (16, 4)),
    ],
)  # fmt: skip
def test_each_variant_changes_only_its_recipe_keys_and_tile(variant, changed, tile, patches):
    default_recipe, default_tile = copy.deepcopy(gain.RECIPE), gain.TILE
    recipe, variant_tile = gain.configure(variant)
    fresh = copy.deepcopy(recipe)
    assert variant_tile == tile
    assert {k: v for k, v in recipe.items() if gain.RECIPE[k] != v} == changed
    assert recipe.keys() == gain.RECIPE.keys()
    # The model and objective the recipe builds see the stated number of patches.
    assert visible_patches(recipe, tile) == patches
    # The variant's recipe is a copy: changing it leaves the default and the variant untouched.
    recipe["model"]["kwargs"]["patch_size"] = 2
    recipe["objective"]["kwargs"]["mask_ratio"] = 0.1
    assert gain.RECIPE == default_recipe and gain.TILE == default_tile
    assert gain.configure(variant) == (fresh, tile)


def test_unknown_variant_is_refused_naming_the_variants(capsys):
    with pytest.raises(ValueError, match="'patch2'.*patch4, mask50, tile32"):
        gain.configure("patch2")
    with pytest.raises(SystemExit):
        gain.main(["--variant", "patch2"])
    err = capsys.readouterr().err
    assert "'patch2'" in err and all(name in err for name in gain.VARIANTS)


def fake_run(work: Path, smoke: bool, variant: str | None = None) -> dict:
    """What ``gain.run`` returns, without running anything: the configured recipe and canned
    measurements (one paired row per protocol)."""
    recipe, _ = gain.configure(variant)
    rows = [paired_row(0.01, 0.2), paired_row(-0.02, 0.05, protocol="knn")]
    return {
        "recipe": recipe,
        "suite": gain.SUITE,
        "data": {
            key: {"samples": 9, "sensors": {}, "bands": 2} for key in ("indian_pines", "enmap")
        },
        "pretrain": {"steps": 300, "finished_step": 300, "losses": {50: 0.9, 300: 0.7}},
        "stages_s": {"pretrain": 1.0},
        "cells": [],
        "rows": rows,
        "verdict": gain.verdict(rows),
    }


def test_variant_results_are_named_and_described_apart_from_the_default(monkeypatch, tmp_path):
    monkeypatch.setattr(gain, "run", fake_run)
    gain.main(["--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "pretraining_gain.json",
        "pretraining_gain.md",
    ]
    default = json.loads((tmp_path / "pretraining_gain.json").read_text())
    assert "variant" not in default
    assert "variant" not in (tmp_path / "pretraining_gain.md").read_text()

    gain.main(["--out", str(tmp_path), "--variant", "tile32"])
    gain.main(["--out", str(tmp_path), "--variant", "patch4"])
    tile32 = json.loads((tmp_path / "pretraining_gain_tile32.json").read_text())
    assert tile32["variant"] == {
        "name": "tile32", "why": gain.VARIANTS["tile32"]["why"], "recipe": {}, "tile": 32,
    }  # fmt: skip
    md = (tmp_path / "pretraining_gain_tile32.md").read_text()
    assert md.splitlines()[0].endswith("variant tile32")
    assert "tiles of 32 px at ingest instead of 16" in md and "9 tiles of 32 px" in md
    patch4 = json.loads((tmp_path / "pretraining_gain_patch4.json").read_text())
    assert patch4["variant"]["recipe"] == {"model": {"kwargs": {"patch_size": 4}}}
    assert patch4["recipe"]["model"]["kwargs"] == {"patch_size": 4}
    md = (tmp_path / "pretraining_gain_patch4.md").read_text()
    assert "`model.kwargs.patch_size = 4`" in md and "vit_test_patch8 (patch_size=4)" in md
    # The default's files were not touched by the variants' runs.
    assert json.loads((tmp_path / "pretraining_gain.json").read_text()) == default


def run_smoke(sample_data: Path, out: Path, *extra: str) -> tuple[dict, str]:
    """The script's --smoke run, in a process of its own (pretraining starts a process group);
    its JSON result and Markdown."""
    env = dict(os.environ, EOFORGE_SAMPLE_DATA=str(sample_data), DS_ACCELERATOR="cpu")
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *extra],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-6000:]
    name = "pretraining_gain" + (
        f"_{extra[extra.index('--variant') + 1]}" if "--variant" in extra else ""
    )
    assert sorted(p.name for p in out.iterdir()) == [f"{name}.json", f"{name}.md"]
    result = json.loads((out / f"{name}.json").read_text())
    return result, (out / f"{name}.md").read_text()


@pytest.fixture(scope="module")
def smoke(sample_data, tmp_path_factory):
    return run_smoke(sample_data, tmp_path_factory.mktemp("pretraining_gain"))


@pytest.mark.slow
def test_smoke_ingests_both_sensors_and_pretrains_the_stated_steps(smoke):
    result, _ = smoke
    assert result["smoke"] is True
    assert result["data"]["indian_pines"] == {
        "samples": 81,
        "sensors": {"AVIRIS": 81},
        "bands": 200,
    }
    assert result["data"]["enmap"] == {"samples": 128, "sensors": {"ENMAP": 128}, "bands": 224}
    pretrain = result["pretrain"]
    assert pretrain["steps"] == result["recipe"]["steps"] == gain.SMOKE["steps"]
    assert pretrain["finished_step"] == pretrain["steps"]
    # log_every=1 at smoke size: one logged loss per step, every one of them finite.
    assert sorted(int(s) for s in pretrain["losses"]) == list(range(1, pretrain["steps"] + 1))
    assert all(math.isfinite(v) for v in pretrain["losses"].values())
    assert pretrain["release"] is True
    # Only the length differs from the measured recipe.
    changed = {k for k in gain.RECIPE if result["recipe"][k] != gain.RECIPE[k]}
    assert changed == {"steps", "log_every", "save_every"}


@pytest.mark.slow
def test_smoke_bench_has_both_encoders_the_paired_row_and_a_consistent_verdict(smoke):
    result, md = smoke
    seeds = result["suite"]["seeds"]
    assert len(seeds) >= 3
    assert len(result["cells"]) == len(seeds) * 2 * 2  # seeds x encoders x protocols
    linear = {
        r["encoder"]: r
        for r in result["rows"]
        if (r["protocol"], r["metric"]) == ("linear", "accuracy")
    }
    assert set(linear) == {"release", "random_init", gain.PAIRED}
    for row in linear.values():
        assert row["n_seeds"] == len(seeds) and math.isfinite(row["ci95"])
    assert 0 <= linear["release"]["mean"] <= 1 and 0 <= linear["random_init"]["mean"] <= 1
    paired, verdict = linear[gain.PAIRED], result["verdict"]
    # The paired mean is the mean of the per-seed differences, so it is the difference of means.
    assert paired["mean"] == pytest.approx(
        linear["release"]["mean"] - linear["random_init"]["mean"]
    )
    assert (verdict["mean"], verdict["ci95"]) == (paired["mean"], paired["ci95"])
    assert verdict["holds"] == (paired["mean"] - paired["ci95"] > 0)
    assert ("DOES NOT HOLD" in md) == (not verdict["holds"])
    assert f"| linear | {gain.PAIRED} | accuracy | {paired['mean']:.4f} ± " in md
    assert "at step 1" in md and f"at step {result['pretrain']['steps']}" in md


@pytest.mark.slow
def test_smoke_repeats_exactly_in_another_work_folder(smoke, sample_data, tmp_path):
    # The work folder is temporary, its name random: where the shards lie must not change the
    # sample order, or the measurement would differ from run to run.
    again, _ = run_smoke(sample_data, tmp_path / "out", "--work", str(tmp_path / "a" / "work"))
    first, _ = smoke
    assert again["pretrain"]["losses"] == first["pretrain"]["losses"]

    def measured(cells):  # every field but the feature extraction's speed, a timing
        return [{k: v for k, v in c.items() if k != "feature_images_per_s"} for c in cells]

    assert measured(again["cells"]) == measured(first["cells"])


@pytest.mark.slow
def test_smoke_tile32_ingests_32_px_tiles_and_probes_the_same_window(smoke, sample_data, tmp_path):
    result, md = run_smoke(sample_data, tmp_path, "--variant", "tile32")
    assert result["variant"]["name"] == "tile32" and result["variant"]["tile"] == 32
    # 145 x 145 px: 4 x 4 whole tiles + 8 edge tiles over half valid (the corner one is not);
    # the 2 EnMAP scenes of 128 x 128 px: 16 tiles each.
    assert result["data"]["indian_pines"]["samples"] == 24
    assert result["data"]["enmap"]["samples"] == 32
    assert "24 tiles of 32 px" in md
    # Only the ingest changes: the recipe is the smoke recipe, the bench the same suite.
    default, _ = smoke
    assert result["recipe"] == default["recipe"]
    assert result["suite"] == default["suite"]
    assert result["pretrain"]["finished_step"] == gain.SMOKE["steps"]
    assert result["verdict"]["n_seeds"] == len(gain.SUITE["seeds"])
