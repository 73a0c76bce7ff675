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
    rows = {"eoforge_zero2", "eoforge_zero1_autocast_guarded", "eoforge_plain"}
    assert set(mae["measured"]["img_per_s"]) == rows | {"ref_zero2", "ref_plain"}
    assert all(v > 0 for v in mae["measured"]["img_per_s"].values())
    selective = json.loads((tmp_path / "selective_mae.json").read_text())
    assert selective["smoke"]
    assert not (REPO_ROOT / "perf" / "results" / "mae_step_smoke.json").exists()
