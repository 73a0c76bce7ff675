"""I-JEPA: multi-block masking, the EMA target encoder (schedule, once per optimizer step,
outside the optimiser, saved and restored exactly), a loss that falls on real Sentinel-2 tiles,
and, on two CPU ranks (gloo, torchrun), the same target encoder under ZeRO-1, 2 and 3 (whose
partitioned parameters the engine gathers for the update) resumed exactly from a checkpoint.

The distributed test runs this file under torchrun; ``__main__`` below is the per-rank program.
"""

from __future__ import annotations

import sys

import pytest
import torch
from real_batches import s2_batch

from eoforge.models import create_model
from eoforge.pretrain.jepa import JEPA, block_size, multi_block_masks, patch_tokens
from eoforge.pretrain.objectives import objective_class

from pretrain_runs import eoforge, scalars, torchrun_script

WORLD = 2
STAGES = (1, 2, 3)


def _jepa(tokenizer: str = "spectral", **kwargs) -> JEPA:
    torch.manual_seed(0)
    options = dict(predictor_dim=32, predictor_depth=1, predictor_heads=4) | kwargs
    return JEPA(create_model("vit_test_patch8", tokenizer=tokenizer), **options)


@pytest.fixture(scope="module")
def batch(sample_data, tmp_path_factory):
    """Four real BigEarthNet Sentinel-2 L2A tiles, 12 bands, 32 x 32 (a 4 x 4 patch grid)."""
    return s2_batch(sample_data, tmp_path_factory.mktemp("s2"), size=32, batch_size=4)


def test_registered():
    assert objective_class("jepa") is JEPA


def test_block_sizes_follow_the_scale_and_aspect_ranges():
    """On a 14 x 14 grid (ViT-B/16 at 224 px): target blocks cover 15-20% of it with height /
    width in 0.75-1.5, up to the rounding of sides to whole patches; context blocks 85-100%
    (sides below the grid's, as I-JEPA's collator keeps them)."""
    torch.manual_seed(0)
    for _ in range(200):
        h, w = block_size((14, 14), (0.15, 0.2), (0.75, 1.5))
        assert 0.15 * 196 - 14 <= h * w <= 0.2 * 196 + 14  # one row or column of rounding
        assert 0.75 - 0.35 <= h / w <= 1.5 + 0.35
        h, w = block_size((14, 14), (0.85, 1.0), (1.0, 1.0))
        assert h == w == 13  # round(sqrt(0.85..1 * 196)) = 13..14, kept below the grid's 14


def test_multi_block_masks():
    torch.manual_seed(0)
    context, target = multi_block_masks(8, (14, 14), "cpu")
    assert target.shape[:2] == (4, 8) and context.shape[0] == 8
    for b in range(8):
        blocks = set(target[:, b].flatten().tolist())
        assert not blocks & set(context[b].tolist())  # targets are removed from the context
        for block in target[:, b]:  # each target block is one rectangle of the drawn size
            rows, cols = block // 14, block % 14
            size = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert size == len(block) == len(set(block.tolist()))
    assert 0.15 * 196 - 14 <= target.shape[-1] <= 0.2 * 196 + 14
    # Several tokens per patch (channel groups, group major): a patch brings all of them.
    assert patch_tokens(torch.tensor([[1, 3]]), 3, 16).tolist() == [[1, 3, 17, 19, 33, 35]]


@pytest.mark.parametrize("tokenizer", ["spectral", "dofa", "channel_groups"])
def test_every_parameter_gets_a_gradient_and_the_target_encoder_none(batch, tokenizer):
    jepa = _jepa(tokenizer=tokenizer)
    out = jepa(batch)
    assert set(out) == {"loss", "loss/S2L2A", "collapse/std", "collapse/mean_cosine"}
    assert torch.isfinite(out["loss"]) and out["collapse/std"] > 0
    out["loss"].backward()
    assert not [n for n, p in jepa.named_parameters() if p.grad is None]
    trainable = {id(p) for p in jepa.parameters()}
    target = jepa.target_encoder.parameters()
    assert all(id(p) not in trainable and not p.requires_grad for p in target)
    assert jepa(batch, preview=True) == {}


def test_ema_once_per_optimizer_step_on_a_schedule_and_saved():
    jepa = _jepa(momentum=0.9, momentum_end=1.0)
    weight = jepa.encoder.blocks[0].attn.qkv.weight
    k0 = jepa.target_encoder.blocks[0].attn.qkv.weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
    jepa.set_progress(0.5)  # m = 0.9 + 0.1 * 0.5
    assert jepa.current_momentum == pytest.approx(0.95)
    jepa.after_optimizer_step()
    k1 = jepa.target_encoder.blocks[0].attn.qkv.weight
    assert torch.allclose(k1, 0.95 * k0 + 0.05 * weight.detach(), atol=1e-6)
    jepa.set_progress(1.0)  # m = 1: the target encoder stops moving
    jepa.after_optimizer_step()
    assert torch.allclose(jepa.target_encoder.blocks[0].attn.qkv.weight, k1)

    restored = _jepa(momentum=0.9)
    restored.load_state_dict(jepa.state_dict())
    saved, loaded = jepa.target_encoder.state_dict(), restored.target_encoder.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    restored.to(torch.bfloat16)  # bf16 engines cast the objective, never the float32 EMA
    assert all(p.dtype == torch.float32 for p in restored.target_encoder.parameters())


def test_loss_falls_on_real_tiles(batch):
    jepa = _jepa(momentum=0.99)
    opt = torch.optim.AdamW(jepa.parameters(), lr=1e-3)
    losses = []
    for step in range(16):
        torch.manual_seed(step)
        jepa.set_progress(step / 16)
        loss = jepa(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        jepa.after_optimizer_step()
        losses.append(round(loss.item(), 4))
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses


def _smooth_batch(rank: int, step: int) -> dict:
    """Smooth synthetic 4-band images [2, 4, 32, 32], different per rank and step."""
    g = torch.Generator().manual_seed(100 * step + rank)
    coarse = torch.randn(2, 4, 4, 4, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear")
    return {
        "S2L2A": {
            "image": images,
            "band_ids": ["S2L2A:B02", "S2L2A:B03", "S2L2A:B04", "S2L2A:B08"],
            "wavelengths": torch.tensor([492.4, 559.8, 664.6, 832.8]),
        },
        "meta": {},
    }


def rank_main(out_dir: str) -> None:
    """Per stage: two optimizer steps with the hook, a checkpoint, and a fresh engine that
    loads it; rank 0 saves each stage's target encoder and whether the load restored it."""
    from pathlib import Path

    from eoforge.launch.checkpoints import newest_whole
    from eoforge.launch.distributed import init_distributed
    from eoforge.launch.engine import DeepSpeedEngine

    rank = init_distributed().rank
    options = dict(micro_batch=2, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95), precision="fp32")
    results = {}
    for stage in STAGES:
        jepa = _jepa(momentum=0.5)
        engine = DeepSpeedEngine(jepa, zero_stage=stage, **options)
        for step in range(2):
            torch.manual_seed(step * WORLD + rank)  # other masks on each rank, as in training
            jepa.set_progress(step / 4)
            engine.backward_step(engine(_smooth_batch(rank, step))["loss"])
            jepa.after_optimizer_step(engine.full_parameters)
        folder = Path(out_dir) / f"zero{stage}"
        engine.save(folder, 2, {"step": 2}, keep_last=1)
        target = {k: v.clone() for k, v in jepa.target_encoder.state_dict().items()}

        fresh = _jepa(momentum=0.5)  # the initial target encoder until the checkpoint loads
        DeepSpeedEngine(fresh, zero_stage=stage, **options).load(
            newest_whole(folder, is_main=rank == 0)
        )
        loaded = fresh.target_encoder.state_dict()
        moved = not torch.equal(target["blocks.0.attn.qkv.weight"], _initial_qkv())
        exact = all(torch.equal(target[k], loaded[k]) for k in target)
        results[stage] = {"target": target, "exact": exact, "moved": moved}
    if rank == 0:
        torch.save(results, Path(out_dir) / "rank0.pt")
    torch.distributed.destroy_process_group()


def _initial_qkv() -> torch.Tensor:
    return _jepa().encoder.blocks[0].attn.qkv.weight.detach()


@pytest.mark.slow
def test_target_encoder_under_zero_1_2_3_on_two_ranks_resumes_exactly(tmp_path):
    """The EMA reads whole parameters under every stage (ZeRO-3 gathers them through the
    engine): the three stages end with the same target encoder, and each stage's checkpoint
    restores it bit for bit."""
    torchrun_script(__file__, [str(tmp_path)], tmp_path, nproc=WORLD)
    results = torch.load(tmp_path / "rank0.pt")
    for stage in STAGES:
        assert results[stage]["exact"] and results[stage]["moved"], stage
    reference = results[1]["target"]
    for stage in STAGES[1:]:
        for name, value in results[stage]["target"].items():
            assert torch.allclose(value, reference[name], atol=1e-5), (stage, name)


@pytest.mark.slow
def test_training_loop_under_zero3_on_two_ranks_resumes_exactly(tmp_path):
    """Through the training loop (its hook, the engine's gathers, its checkpoints): a run
    stopped after step 2 and resumed continues as the uninterrupted run does, losses and target
    encoder alike."""
    cache = tmp_path / "cache"
    full, split = tmp_path / "full", tmp_path / "split"
    args = [
        "pretrain",
        "--config",
        "jepa",
        "data.demo=true",
        "model.name=vit_test_patch8",
        "steps=4",
        "log_every=1",
        "save_every=100",
        "image_every=100",
        "data.batch_size=2",
        "engine.precision=fp32",
        "engine.zero_stage=3",
        "release.export=false",
        "objective.kwargs.predictor_dim=32",
        "objective.kwargs.predictor_depth=1",
        "objective.kwargs.predictor_heads=4",
        "optim.lr=1e-3",
        "optim.warmup_steps=1",
        "optim.warmup_fraction=null",  # the shipped config states warm-up as a fraction
        "objective.kwargs.momentum=0.5",  # a target encoder that moves far in 4 steps
    ]
    eoforge([*args, f"run_dir={full}"], cache, nproc=WORLD)
    eoforge([*args, f"run_dir={split}", "stop_at=2"], cache, nproc=WORLD)
    assert "resuming at step 2" in eoforge([*args, f"run_dir={split}"], cache, nproc=WORLD).stdout
    expected, resumed = scalars(full, "loss"), scalars(split, "loss")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    targets = [
        torch.load(
            next((run / "checkpoints" / "step_00000004").glob("*rank_0_*model_states.pt")),
            weights_only=False,
        )["module"]["_extra_state"]["key_model"]
        for run in (full, split)
    ]
    for name, value in targets[0].items():
        assert torch.allclose(value, targets[1][name], rtol=1e-5, atol=1e-7), name


if __name__ == "__main__":
    rank_main(sys.argv[1])
