"""perf/pretraining_gain.py: the verdict's criterion, and the whole pipeline at smoke size
(GeoTIFF -> shards -> pretraining -> bench) on the real Indian Pines and EnMAP samples."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    result = json.loads((out / "pretraining_gain.json").read_text())
    return result, (out / "pretraining_gain.md").read_text()


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
    assert again["cells"] == first["cells"]
