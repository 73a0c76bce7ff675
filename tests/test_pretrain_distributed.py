"""Two CPU ranks on DeepSpeed (gloo): ZeRO-2 and ZeRO-3 train, save, resume and continue exactly
as an uninterrupted run; a ZeRO-3 run round-trips through the release format."""

from __future__ import annotations

import json

import pytest
import torch

from eoforge.models import load_release

from pretrain_runs import eoforge, scalars

pytestmark = pytest.mark.slow

COMMON = [
    "steps=6",
    "log_every=1",
    "image_every=100",
    "save_every=100",
    "engine.precision=fp32",
    "data.batch_size=4",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("eoforge-cache")


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_matches_uninterrupted_run(tmp_path, cache, stage):
    full, split = tmp_path / "full", tmp_path / "split"
    args = [*COMMON, f"engine.zero_stage={stage}", "release.export=false"]
    eoforge(["pretrain", f"run_dir={full}", *args], cache, nproc=2)
    first = eoforge(["pretrain", f"run_dir={split}", "stop_at=3", *args], cache, nproc=2)
    assert "stopping at step 3" in first.stdout
    second = eoforge(["pretrain", f"run_dir={split}", *args], cache, nproc=2)
    assert "resuming at step 3" in second.stdout

    expected, resumed = scalars(full, "loss"), scalars(split, "loss")
    assert sorted(expected) == sorted(resumed) == [1, 2, 3, 4, 5, 6]  # no gap, no duplicate step
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    assert len({round(v, 6) for v in expected.values()}) > 1  # the losses actually move
    # Sharded: one optimizer-state file per rank.
    ckpt = sorted((split / "checkpoints").glob("step_*"))[-1]
    assert len(list(ckpt.glob("*optim_states.pt"))) == 2
    env = json.loads((split / "env.json").read_text())
    assert env["world_size"] == 2 and env["packages"]["deepspeed"]


def test_release_round_trip_from_zero3(tmp_path, cache):
    run = tmp_path / "z3"
    eoforge(["pretrain", f"run_dir={run}", *COMMON, "engine.zero_stage=3"], cache, nproc=2)
    out = tmp_path / "release"
    eoforge(["release", "build", str(run), str(out)], cache)
    eoforge(["release", "verify", str(out)], cache)

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = sorted((run / "checkpoints").glob("step_*"))[-1].name
    state = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=tag)
    release = load_release(out)
    loaded = release.encoder.state_dict()
    encoder_keys = {k.removeprefix("encoder.") for k in state if k.startswith("encoder.")}
    assert encoder_keys == set(loaded)
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[f"encoder.{key}"], rtol=0, atol=0)
    card = release.card
    assert card["steps"] == 6 and card["objective"]["name"] == "mae"
    assert {b["sensor"] for b in card["bands"]} == {"S2L2A", "S1GRD", "ENMAP"}
    assert set(card["normalisation"]) == {b["band_id"] for b in card["bands"]}
    # The release the run wrote itself matches the one built afterwards.
    assert (
        json.loads((run / "release" / "card.json").read_text())["weights_sha256"]
        == card["weights_sha256"]
    )


def test_zero1_bf16_single_process(tmp_path, cache):
    run = tmp_path / "bf16"
    result = eoforge(
        [
            "pretrain",
            f"run_dir={run}",
            "steps=4",
            "log_every=2",
            "engine.zero_stage=1",
            "engine.precision=bf16",
        ],
        cache,
    )
    assert "ZeRO-1 bf16" in result.stdout
    loss = scalars(run, "loss")
    assert sorted(loss) == [2, 4] and all(0 < v < 10 for v in loss.values())
    assert load_release(run / "release").card["steps"] == 4


SHORT = ["steps=3", "log_every=1", "image_every=100", "release.export=false"]


@pytest.fixture(scope="module")
def eager_fp32_losses(tmp_path_factory, cache):
    run = tmp_path_factory.mktemp("eager")
    eoforge(["pretrain", f"run_dir={run}", "engine.precision=fp32", *SHORT], cache)
    return scalars(run, "loss")


def test_compiled_objective_trains_like_the_eager_one(tmp_path, cache, eager_fp32_losses):
    """engine.compile=true runs the objective through torch.compile inside DeepSpeed (the
    faster path on a GPU); it draws the same masks, so its losses equal the eager run's."""
    args = ["engine.compile=true", "engine.precision=fp32", *SHORT]
    eoforge(["pretrain", f"run_dir={tmp_path}", *args], cache)
    got = scalars(tmp_path, "loss")
    assert sorted(got) == [1, 2, 3]
    for step, expected in eager_fp32_losses.items():
        assert got[step] == pytest.approx(expected, rel=1e-4), step


def test_bf16_autocast_keeps_fp32_weights_and_follows_the_fp32_run(tmp_path, cache):
    """engine.precision=bf16-autocast on two ranks: fp32 weights and optimizer, bf16 matmuls
    under torch.autocast, Linear gradients reduced in bf16 (DeepSpeed's torch_autocast); the
    losses stay within bf16's rounding of the fp32 run's."""
    runs = {}
    for precision in ("fp32", "bf16-autocast"):
        run = tmp_path / precision
        args = [f"run_dir={run}", f"engine.precision={precision}", *SHORT]
        eoforge(["pretrain", *args], cache, nproc=2)
        runs[precision] = scalars(run, "loss")
    expected, got = runs["fp32"], runs["bf16-autocast"]
    assert sorted(got) == [1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=2e-2), step
    assert got != expected  # the matmuls did run in bf16
    # The module's weights stay fp32 (the bf16 mode would save them in bf16).
    checkpoint = sorted((tmp_path / "bf16-autocast" / "checkpoints").glob("step_*"))[-1]
    states = torch.load(next(checkpoint.glob("*model_states.pt")), weights_only=False)
    weights = [v for v in states["module"].values() if v.is_floating_point()]
    assert weights and all(v.dtype == torch.float32 for v in weights)
