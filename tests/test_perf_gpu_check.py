"""perf/gpu_check.sh --smoke: the GPU benchmark's code at tiny shapes on a CPU, so the one
script a lent GPU session runs cannot rot between sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REF_MAE = REPO_ROOT.parent / "shared" / "bench" / "ref_mae.py"


@pytest.mark.slow
def test_gpu_check_smoke_runs_the_benchmarks_on_cpu(tmp_path):
    if not REF_MAE.is_file():
        message = f"reference MAE not found at {REF_MAE}"
        if os.environ.get("EOFORGE_REQUIRE_SAMPLE_DATA") == "1":
            pytest.fail(message + " (shared/ is required here)")
        pytest.skip(message)
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, REF_MAE=str(REF_MAE))
    env.update(OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    run = subprocess.run(
        ["bash", str(REPO_ROOT / "perf" / "gpu_check.sh"), "--smoke"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    mae = json.loads((tmp_path / "mae_step_smoke.json").read_text())
    assert mae["smoke"] and mae["device"] == "CPU" and not mae["gate"]["gated"]
    rows = {"eoforge_zero2", "eoforge_zero2_autocast_guarded", "eoforge_zero2_bf16"}
    rows |= {"eoforge_plain", "ref_zero2", "ref_zero2_autocast", "ref_plain"}
    assert set(mae["measured"]["img_per_s"]) == rows
    precisions = {n: s["precision"] for n, s in mae["measured"]["row_settings"].items()}
    assert precisions["eoforge_zero2"] == "fp32"  # auto on a CPU
    assert precisions["eoforge_zero2_autocast_guarded"] == "bf16-autocast"
    assert precisions["eoforge_zero2_bf16"] == "bf16"
    assert precisions["ref_zero2"] == "fp32" and precisions["ref_zero2_autocast"] == "bf16-autocast"
    assert all(v > 0 for v in mae["measured"]["img_per_s"].values())
    # Memory is measured on a GPU only; its columns render from the JSON a GPU run writes.
    assert "memory_gib" not in mae["measured"]
    mae["measured"]["memory_gib"] = {n: {"resident": 1.5, "step_peak": 20.25} for n in rows}
    sys.path.insert(0, str(REPO_ROOT / "perf"))
    try:
        import mae_step
    finally:
        sys.path.pop(0)
    table = mae_step.markdown(mae)
    assert "| eoforge_zero2_bf16 | bf16 |" in table and "| 1.50 | 20.25 |" in table
    selective = json.loads((tmp_path / "selective_mae.json").read_text())
    assert selective["smoke"]
    assert not (REPO_ROOT / "perf" / "results" / "mae_step_smoke.json").exists()


@pytest.mark.slow
def test_a_row_that_fails_is_reported_and_the_rest_still_measured(tmp_path):
    """One row's failure (a compile error on the device, say) must not cost the whole run."""
    if not REF_MAE.is_file():
        pytest.skip(f"reference MAE not found at {REF_MAE}")
    script = f"""
import sys
sys.path.insert(0, {str(REPO_ROOT / "perf")!r})
import mae_step
build = mae_step.eoforge_step
def planted(cfg, device, **options):
    if options.get("plain"):
        raise RuntimeError("planted failure")
    return build(cfg, device, **options)
mae_step.eoforge_step = planted
mae_step.main(["--smoke", "--out", {str(tmp_path)!r}, "--ref", {str(REF_MAE)!r}])
"""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads((tmp_path / "mae_step_smoke.json").read_text())["measured"]
    assert measured["failed"] == {"eoforge_plain": "RuntimeError: planted failure"}
    assert "eoforge_plain" not in measured["img_per_s"]
    assert {"eoforge_zero2", "ref_zero2", "ref_plain"} <= set(measured["img_per_s"])
    table = (tmp_path / "mae_step_smoke.md").read_text()
    assert "Row eoforge_plain failed and is left out: RuntimeError: planted failure" in table
