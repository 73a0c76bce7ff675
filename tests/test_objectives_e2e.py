"""Every shipped objective config runs end to end on DeepSpeed (CPU) on real shards, in the
GPU's default precision (fp32 weights, bf16 autocast), and the release it writes records the
objective.

The shipped configs carry the published recipes (ViT-B, 512-wide decoders, long schedules); the
runs here override only the sizes and the schedule, so the objective, its options and the data
path are the shipped ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from real_batches import BEN, ENMAP, ENMAP_PATTERN, SSL4EO

from eoforge.datasets.ingest import build_shards
from eoforge.datasets.pairs import build_paired_shards
from eoforge.datasets.stats import compute_stats

from pretrain_runs import eoforge, scalars

pytestmark = pytest.mark.slow

RUN = [
    "steps=3",
    "log_every=1",
    "image_every=3",
    "save_every=3",
    # The GPU default (auto): every objective's forward, preview and backward under bf16
    # autocast with fp32 weights; the CPU default, fp32, runs in the demo and the other tests.
    "engine.precision=bf16-autocast",
    "data.batch_size=2",
    "data.num_workers=0",
    "optim.warmup_steps=1",
    "optim.warmup_fraction=null",  # shipped configs that state warm-up as a fraction
]
SMALL_DECODER = [
    "objective.kwargs.decoder_dim=32",
    "objective.kwargs.decoder_depth=1",
    "objective.kwargs.decoder_heads=4",
]


@pytest.fixture(scope="module")
def shards(sample_data, tmp_path_factory) -> dict[str, Path]:
    """Real shard folders (with stats): S2, EnMAP, BigEarthNet S2+S1 pairs, SSL4EO S2 seasons."""
    out = tmp_path_factory.mktemp("shards")
    folders = {
        "s2": out / "s2",
        "enmap": out / "enmap",
        "pairs": out / "pairs",
        "seasons": out / "seasons",
    }
    build_shards(
        sample_data / BEN / "s2-tiny", folders["s2"], "S2L2A", tile_size=64, progress=False
    )
    build_shards(
        sample_data / ENMAP,
        folders["enmap"],
        "ENMAP",
        pattern=ENMAP_PATTERN,
        tile_size=32,
        progress=False,
    )
    build_paired_shards(
        sample_data / BEN,
        folders["pairs"],
        "S2L2A",
        pair=["S1GRD"],
        layout="bigearthnet",
        time_window_days=1.0,
        tile_size=64,
        shard_size=4,  # several shards, so each of two ranks reads its own
        progress=False,
    )
    build_paired_shards(
        sample_data / SSL4EO,
        folders["seasons"],
        "S2L2A",
        layout="ssl4eo",
        series=True,
        tile_size=64,
        progress=False,
    )
    for folder in folders.values():
        compute_stats(folder, progress=False)
    return folders


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("eoforge-cache")


CASES = {
    "selective_mae": ("s2", "vit_test_patch8", SMALL_DECODER),
    "multiscale_mae": ("s2", "vit_test_patch8", SMALL_DECODER),
    "hyper_mae": ("enmap", "less_test_patch8", SMALL_DECODER),
    "mixup_mae": ("pairs", "vit_test_patch8", SMALL_DECODER),
    "croma": (
        "pairs",
        "vit_test_patch8",
        ["objective.kwargs.decoder_dim=32", "objective.kwargs.decoder_depth=1"],
    ),
    "instance_contrast": ("s2", "vit_test_patch8", ["objective.kwargs.queue_size=16"]),
    "seasonal_contrast": (
        "seasons",
        "vit_test_patch8",
        ["objective.kwargs.queue_size=16", "data.batch_size=1"],
    ),
    # S2 + S1 pairs: two sensors, so whole sensors are assigned to input or target.
    "latent_mim": ("pairs", "vit_test_patch8", [*SMALL_DECODER, "objective.kwargs.proj_dim=16"]),
    "jepa": (
        "s2",
        "vit_test_patch8",
        [
            "objective.kwargs.predictor_dim=32",
            "objective.kwargs.predictor_depth=1",
            "objective.kwargs.predictor_heads=4",
        ],
    ),
}

# Objectives whose embeddings can collapse log contrastive.embedding_health to TensorBoard.
COLLAPSE_LOGGED = {"instance_contrast", "seasonal_contrast", "latent_mim", "jepa"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_shipped_config_trains_and_releases(name, shards, cache, tmp_path):
    data, model, options = CASES[name]
    run = tmp_path / name
    eoforge(
        [
            "pretrain",
            "--config",
            name,
            f"run_dir={run}",
            f"model.name={model}",
            f"data.shards=[{shards[data]}]",
            *RUN,
            *options,
        ],
        cache,
    )
    losses = scalars(run, "loss")
    assert sorted(losses) == [1, 2, 3]
    if name in COLLAPSE_LOGGED:
        assert sorted(scalars(run, "collapse/std")) == [1, 2, 3]
    card = json.loads((run / "release" / "card.json").read_text())
    assert card["objective"]["name"] == name and card["objective"]["label"] == name
    assert card["steps"] == 3
    eoforge(["release", "verify", str(run / "release")], cache)


def test_composition_over_one_encoder_on_two_ranks(shards, cache, tmp_path):
    """MAE + CROMA on the S2+S1 pairs, two ranks (negatives gathered across them), ZeRO-2."""
    run = tmp_path / "mae_croma"
    terms = (
        "objective.terms=[{name: mae, weight: 1.0, kwargs: {decoder_dim: 32, decoder_depth: 1,"
        " decoder_heads: 4}}, {name: croma, weight: 0.5, kwargs: {decoder_dim: 32,"
        " decoder_depth: 1}}]"
    )
    eoforge(
        [
            "pretrain",
            "--config",
            "croma",
            f"run_dir={run}",
            "model.name=vit_test_patch8",
            f"data.shards=[{shards['pairs']}]",
            *RUN,
            "data.batch_size=1",
            terms,
        ],
        cache,
        nproc=2,
    )
    total, mae, croma = (scalars(run, tag) for tag in ("loss", "mae/loss", "croma/loss"))
    for step in total:
        assert total[step] == pytest.approx(mae[step] + 0.5 * croma[step], rel=1e-5)
    card = json.loads((run / "release" / "card.json").read_text())
    assert card["objective"]["label"] == "mae+croma"


def test_momentum_copy_moves_once_per_optimizer_step(shards, cache, tmp_path):
    """instance_contrast with two micro-batches per optimizer step and m = 0.5: between the
    checkpoints of steps 1 and 2 the key encoder moves once, k2 = m k1 + (1 - m) q2; an update
    per micro-batch would give k2 = m^2 k1 + (1 - m^2) q1 (momentum m^2)."""
    run = tmp_path / "accumulated"
    eoforge(
        [
            "pretrain",
            "--config",
            "instance_contrast",
            f"run_dir={run}",
            "model.name=vit_test_patch8",
            f"data.shards=[{shards['s2']}]",
            *RUN,
            "steps=2",
            "save_every=1",
            "image_every=2",
            "engine.precision=fp32",
            "optim.global_batch=4",  # 2 micro-batches of 2
            "optim.lr=1e-2",  # steps large enough to tell the two updates apart
            "release.export=false",
            "objective.kwargs.queue_size=16",
            "objective.kwargs.momentum=0.5",
        ],
        cache,
    )
    states = [
        torch.load(
            run / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt",
            weights_only=False,
        )["module"]
        for step in (1, 2)
    ]
    weight = "encoder.blocks.0.attn.qkv.weight"
    k1, k2 = (state["_extra_state"]["key_model"][weight] for state in states)
    q1, q2 = (state[weight] for state in states)
    assert torch.allclose(k2, 0.5 * k1 + 0.5 * q2, atol=1e-6)
    assert not torch.allclose(k2, 0.25 * k1 + 0.75 * q1, atol=1e-4)
