"""perf/scaling.py --smoke: real parameter counts, ZeRO memory per GPU, agreement with DeepSpeed's
estimators, activations against the H100 measurement, and communication per step."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import timm
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT.parent / "shared" / "bench"
GIB = 2**30


def load_script():
    spec = importlib.util.spec_from_file_location("scaling", REPO_ROOT / "perf" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if not (BENCH / "ref_mae_h100.json").is_file():
        message = f"H100 measurements not found in {BENCH}"
        if os.environ.get("EOFORGE_REQUIRE_SAMPLE_DATA") == "1":
            pytest.fail(message + " (shared/ is required here)")
        pytest.skip(message)
    out = tmp_path_factory.mktemp("scaling")
    result = load_script().main(["--smoke", "--out", str(out), "--bench", str(BENCH)])
    return result, out


def test_vit_b_counts_are_the_real_model(smoke):
    result, _ = smoke
    (vit_b,) = [m for m in result["models"] if m["name"] == "ViT-B/16"]
    p = vit_b["params"]
    with torch.device("meta"):
        ref = timm.create_model("vit_base_patch16_224", num_classes=0, pretrained=False)
    timm_total = sum(q.numel() for q in ref.parameters())
    assert abs(timm_total - 86e6) / 86e6 < 0.01  # the "86M" of ViT-B/16
    # The same trunk as timm's ViT-B/16, whose RGB patch embedding and learned positions are
    # replaced by the spectrum-aware tokenizer (17 ranges x (16*16 -> 768)) and sincos positions.
    rgb_embed = sum(q.numel() for q in ref.patch_embed.parameters()) + ref.pos_embed.numel()
    assert p["encoder_trunk"] == timm_total - rgb_embed
    assert p["tokenizer"] == 17 * (16 * 16 * 768 + 768)
    assert p["encoder"] == p["encoder_trunk"] + p["tokenizer"]
    block_512 = 12 * 512**2 + 13 * 512  # qkv, proj, fc1, fc2 with biases, two LayerNorms
    assert p["decoder"] > 8 * block_512 and p["decoder"] - 8 * block_512 < 0.5e6
    assert p["head"] == 17 * (512 * 256 + 256)
    assert p["total"] == p["encoder"] + p["decoder"] + p["head"]
    # Model FLOPs agree with the reference MAE's count at the same shapes (within 2%).
    assert vit_b["flops_per_image"] / result["measured"]["flops_per_image"] == pytest.approx(
        1.0, abs=0.02
    )


def test_zero_stages_shard_what_they_should(smoke):
    result, out = smoke
    saved = json.loads((out / "scaling.json").read_text())
    for model in saved["models"]:
        params = model["params"]["total"]
        mem = model["memory_bytes"]
        one = {stage: mem[stage]["1"]["total"] for stage in ("1", "2", "3")}
        assert one["1"] == one["2"] == one["3"] == 16 * params
        for gpus in result["config"]["gpus"]:
            g = str(gpus)
            assert mem["3"][g]["total"] == pytest.approx(one["3"] / gpus)
            # Only the sharded parts shrink: 12 P (ZeRO-1), 14 P (ZeRO-2) over N.
            assert mem["2"][g]["total"] == pytest.approx(2 * params + 14 * params / gpus)
            assert mem["1"][g]["total"] == pytest.approx(4 * params + 12 * params / gpus)
    assert "| ZeRO-3 |" in (out / "scaling.md").read_text()


def test_deepspeed_estimators_agree_after_their_extra_terms(smoke):
    result, _ = smoke
    tolerance = 0.005 + 1e-9  # DeepSpeed prints GiB with two decimals
    for model in result["models"]:
        params, largest = model["params"]["total"], model["params"]["largest_layer"]
        assert len(model["estimator"]) == 2 * len(result["config"]["gpus"])
        for row in model["estimator"]:
            assert abs(row["residual_gib"]) <= tolerance, row
            if row["stage"] == 2:  # the fp32 gradient partition
                expected = 4 * params / row["gpus"] / GIB
            else:
                expected = (2 * params / row["gpus"] + 4 * largest) / GIB
            assert abs(row["difference_gib"] - expected) <= tolerance, row
    # DeepSpeed's own count of the real model matches this script's.
    assert result["live_check"]["zero2_same"] and result["live_check"]["zero3_same"]


def test_activation_estimate_matches_the_measured_h100_peak(smoke):
    result, _ = smoke
    check = result["measured_check"]
    assert 0.85 < check["ratio"] < 1.15, check
    (vit_b,) = result["models"]
    act = vit_b["activations"]
    assert act["seq_encoder"] == 1 + 49 and act["seq_decoder"] == 1 + 196  # 25% visible at 224
    assert act["korthikanti"]["total"] > act["fused"]["total"] > act["tokenizer_loss"] > 0


def test_communication_against_compute(smoke):
    result, _ = smoke
    (vit_b,) = result["models"]
    params, gpus = vit_b["params"]["total"], max(result["config"]["gpus"])
    z1, z2, z3 = vit_b["communication"]
    assert z2["bytes"] == pytest.approx(4 * params * (gpus - 1) / gpus) == z1["bytes"]
    assert z3["bytes"] == pytest.approx(1.5 * z2["bytes"])
    slow, fast = z2["at"][0], z2["at"][-1]
    assert slow["comm_s"] / fast["comm_s"] == pytest.approx(fast["gbps"] / slow["gbps"])
    # Where communication takes longer than the step, the bandwidth to hide it is higher.
    assert (slow["comm_over_compute"] > 1) == (z2["hide_gbps"] > slow["gbps"])
    assert f"{z2['hide_gbps']:.0f} Gb/s" in result["paragraph"]
