"""The embedded default end to end: `eoforge pretrain` with no arguments, then release and a
linear probe on real Indian Pines patches."""

from __future__ import annotations

import json
import time

import pytest

from eoforge.models import verify_release

from pretrain_runs import eoforge, image_tags, scalars

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Runs `eoforge pretrain` in an empty folder with a fresh cache; returns (cwd, result, seconds)."""
    cwd = tmp_path_factory.mktemp("demo")
    cache = tmp_path_factory.mktemp("cache")
    start = time.perf_counter()
    result = eoforge(["pretrain"], cache, cwd=cwd)
    return cwd, cache, result, time.perf_counter() - start


def test_demo_runs_end_to_end_in_under_three_minutes(demo):
    cwd, _, result, seconds = demo
    run = cwd / "runs" / "demo"
    assert seconds < 180, f"demo took {seconds:.0f} s"
    for name in ("config.yaml", "env.json", "finished.json", "logs/rank0.log"):
        assert (run / name).is_file(), name
    env = json.loads((run / "env.json").read_text())
    assert {"git_sha", "packages", "world_size"} <= set(env)
    assert list((run / "checkpoints").glob("step_*/complete.json"))
    card = verify_release(run / "release")
    assert card["steps"] == 200
    assert {b["sensor"] for b in card["bands"]} == {"S2L2A", "S1GRD", "ENMAP"}
    assert "eoforge eval linear --release" in result.stdout  # the printed next step


def test_demo_logs_scalars_and_reconstruction_grids(demo):
    run = demo[0] / "runs" / "demo"
    loss = scalars(run, "loss")
    assert sorted(loss) == list(range(20, 201, 20))
    assert loss[200] < 0.85 * loss[20], loss  # it learns
    for tag in ("lr", "samples_per_s", "grad_norm"):
        assert len(scalars(run, tag)) == 10, tag
    assert {"reconstruction/S2L2A", "reconstruction/S1GRD", "reconstruction/ENMAP"} & set(
        image_tags(run)
    )


def test_relaunching_a_finished_demo_says_so(demo):
    cwd, cache, _, _ = demo
    again = eoforge(["pretrain"], cache, cwd=cwd)
    assert "already finished" in again.stdout


def test_linear_probe_on_the_demo_release_beats_majority(demo, sample_data, tmp_path):
    cwd, cache, _, _ = demo
    out = tmp_path / "linear.json"
    eoforge(
        [
            "eval",
            "linear",
            "--release",
            str(cwd / "runs" / "demo" / "release"),
            "--dataset",
            f"indian_pines:{sample_data / 'indian_pines_aviris'}",
            "--out",
            str(out),
        ],
        cache,
    )
    result = json.loads(out.read_text())
    assert result["n_classes"] >= 10
    assert result["accuracy"] > result["majority_baseline"], result
