"""perf/label_efficiency.py: the gates' criterion, the staging that keeps every test scene out of
pretraining, and the whole pipeline at smoke size (EuroSAT RGB + MS -> shards -> pretraining ->
release -> bench with three encoders -> curve)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eoforge.datasets.eurosat import scene_id, scene_splits

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "perf" / "label_efficiency.py"
spec = importlib.util.spec_from_file_location("label_efficiency", SCRIPT)
efficiency = importlib.util.module_from_spec(spec)
spec.loader.exec_module(efficiency)


def row(entry, protocol, baseline, mean, ci95):
    return {
        "dataset": entry,
        "protocol": protocol,
        "encoder": f"release - {baseline}",
        "metric": "accuracy",
        "mean": mean,
        "ci95": ci95,
        "n_seeds": 5,
    }


def test_a_gate_needs_its_whole_paired_interval_above_zero():
    rows = [
        row("rgb_10", "linear", "random_init", 0.05, 0.04),
        row("rgb_10", "knn", "random_init", 0.05, 0.05),
    ]
    assert efficiency.paired(rows, "rgb_10", "linear", "random_init")["holds"]
    assert not efficiency.paired(rows, "rgb_10", "knn", "random_init")["holds"]  # touches 0
    rows.append(row("ms_10", "linear", "random_init", 0.3, math.nan))
    assert not efficiency.paired(rows, "ms_10", "linear", "random_init")["holds"]  # no interval
    with pytest.raises(RuntimeError, match="0 rows for rgb_10 linear release - supervised"):
        efficiency.paired(rows, "rgb_10", "linear", "supervised")


def test_staging_keeps_every_test_scene_of_both_forms_out(sample_data, tmp_path, monkeypatch):
    monkeypatch.setattr(efficiency, "SAMPLE_DATA", sample_data)
    staged = efficiency.stage(tmp_path, per_class=30)
    ids = {
        form: {scene_id(p) for p in (tmp_path / "staged" / form).rglob("*.*")}
        for form in ("rgb", "ms")
    }
    assert staged["rgb"]["staged"] == len(ids["rgb"]) and staged["ms"]["staged"] == len(ids["ms"])
    for form in ("rgb", "ms"):
        splits = scene_splits(sorted(ids[form]), test_fraction=efficiency.TEST_FRACTION)
        assert "test" not in set(splits)
        assert staged[form]["test_scenes"] > 0  # some of the first 30 per class were left out


def run_smoke(sample_data: Path, out: Path, *extra: str) -> tuple[dict, str]:
    """The script's --smoke run, in a process of its own (pretraining starts a process group)."""
    env = dict(os.environ, EOFORGE_SAMPLE_DATA=str(sample_data), DS_ACCELERATOR="cpu")
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--threads", "1", *extra],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-6000:]
    recipe = extra[extra.index("--recipe") + 1] if "--recipe" in extra else None
    name = "label_efficiency" + (f"_{recipe}" if recipe else "") + "_smoke"
    assert sorted(p.name for p in out.iterdir()) == [
        f"{name}.{ext}" for ext in ("json", "md", "png")
    ]
    return json.loads((out / f"{name}.json").read_text()), (out / f"{name}.md").read_text()


@pytest.mark.slow
def test_smoke_runs_every_stage_and_scores_every_gate(sample_data, tmp_path):
    result, md = run_smoke(sample_data, tmp_path / "out")
    assert result["smoke"] and result["recipe"]["objective"]["name"] == "instance_contrast"
    assert result["pretrain"]["finished_step"] == efficiency.SMOKE["steps"]
    assert result["pretrain"]["release"]
    cells = result["cells"]
    # Every entry scored its encoders on every seed and protocol.
    expected = sum(len(enc) for _, _, _, enc in efficiency.ENTRIES) * 3 * 2
    assert len(cells) == expected
    assert {c["dataset"] for c in cells} == {e for e, *_ in efficiency.ENTRIES}
    by_entry = {c["dataset"]: c for c in cells if c["encoder"] == "release"}
    assert by_entry["rgb_10"]["n_train"] == 10 * efficiency.SMOKE["labels"][10]
    assert by_entry["ms_10"]["options"]["form"] == "ms"
    assert [(g["entry"], g["protocol"], g["baseline"]) for g in result["gates"]] == efficiency.GATES
    assert result["gates_hold"] == all(g["holds"] for g in result["gates"])
    assert "## Gates and goals" in md and "label_efficiency_smoke.png" in md


def test_the_shipped_eurosat_best_config_is_the_scored_recipe():
    import yaml

    from eoforge.pretrain.config import find_config

    shipped = yaml.safe_load(find_config("eurosat_best").read_text())
    recipe = efficiency.configure(efficiency.BEST)
    for key in ("model", "objective", "steps"):
        assert shipped[key] == recipe[key], key
    for key in ("batch_size", "sensor_weights", "shuffle_buffer"):
        assert shipped["data"][key] == recipe["data"][key], key
    for key in ("lr", "min_lr", "weight_decay", "betas", "warmup_steps"):
        assert shipped["optim"][key] == recipe["optim"][key], key


@pytest.mark.slow
def test_the_gpu_recipe_runs_its_stages_at_smoke_size_on_the_cpu(sample_data, tmp_path):
    """The lent-GPU recipe (ViT-S at patch 8) through the same pipeline, bench on --device cpu:
    what a GPU session runs, checked where no GPU is."""
    result, _ = run_smoke(
        sample_data, tmp_path / "out", "--recipe", "gpu_vit_small", "--device", "cpu"
    )
    assert result["recipe"]["model"]["name"] == "vit_small_patch16"
    assert {c["device"] for c in result["cells"] if c["protocol"] != "finetune"} == {"cpu"}
