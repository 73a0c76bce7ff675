"""perf/profile_step.py: the tokenizer's band-count-invariant op count, a sync-free MAE step,
and the smoke run's table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from eoforge.models.spectral import SpectrumAwarePatchEmbed, patchify

REPO_ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "profile_step", REPO_ROOT / "perf" / "profile_step.py"
)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

CPU = torch.device("cpu")


class PerBandLoopEmbed(SpectrumAwarePatchEmbed):
    """The same tokens as SpectrumAwarePatchEmbed, projected band by band in a Python loop."""

    def forward(self, images, band_ids, wavelengths):
        mix = self.weights(band_ids, wavelengths, self.weight)  # [C, R]
        patches = patchify(images, self.patch_size)  # [B, C, N, p*p]
        tokens = 0
        for c in range(mix.shape[0]):
            weight = torch.einsum("r,rkd->kd", mix[c], self.weight)  # [p*p, D]
            tokens = tokens + patches[:, c] @ weight + mix[c] @ self.bias  # [B, N, D]
        return tokens * (self.band_scale / mix.shape[0])


def test_tokenizer_op_count_does_not_grow_with_bands():
    torch.manual_seed(0)
    counts = bench.tokenizer_op_counts(SpectrumAwarePatchEmbed(8, 64), side=16)
    assert set(counts) == {4, 12, 200}
    assert counts[4] == counts[12] == counts[200]
    assert 1 <= sum(counts[200]["forward"].values()) <= 4
    assert sum(counts[200]["backward"].values()) >= 1


def test_op_count_exposes_a_per_band_loop():
    # The counter can fail: a per-band loop (same tokens) makes calls grow with the band count.
    torch.manual_seed(0)
    loop = PerBandLoopEmbed(8, 64)
    images = torch.randn(2, 4, 16, 16)
    band_ids = [f"HSI:B{i:03d}" for i in range(4)]
    wavelengths = torch.linspace(420.0, 2400.0, 4).expand(2, -1)
    with pytest.warns(UserWarning, match="inverse-distance"):
        expected = SpectrumAwarePatchEmbed.forward(loop, images, band_ids, wavelengths)
    torch.testing.assert_close(loop(images, band_ids, wavelengths), expected)
    counts = bench.tokenizer_op_counts(loop, side=8)
    forward = {bands: sum(c["forward"].values()) for bands, c in counts.items()}
    assert forward[4] < forward[12] < forward[200]


@pytest.fixture(scope="module")
def shards(sample_data, tmp_path_factory):
    return bench.build_data(bench.SMOKE, tmp_path_factory.mktemp("profile"))


@pytest.fixture()
def step_and_mae(shards):
    step, mae, batches = bench.build_step(bench.SMOKE, shards, CPU)
    step()  # warm-up: the band -> range weights are resolved (a host read) on first sight
    yield step, mae
    del batches  # stops the stream's worker


def test_tiny_mae_step_has_no_host_sync(step_and_mae):
    step, mae = step_and_mae
    assert mae.encoder.patch_size == 8 and mae.encoder.embed_dim == 64  # vit_test_patch8
    syncs = bench.host_syncs(step, CPU)
    assert syncs["count"] == 0, syncs["where"]
    assert syncs["device_to_host_copies"] == 0
    # The CPU fused AdamW kernel reads one step counter per parameter tensor, set apart.
    assert syncs["fused_optimizer_counter_reads"] == len(list(mae.parameters()))


def test_a_host_sync_is_found_and_located(step_and_mae):
    step, mae = step_and_mae
    loss = mae.loss

    def loss_with_a_read(*args):
        value = loss(*args)
        value.item()  # the host read the check must find
        return value

    mae.loss = loss_with_a_read
    syncs = bench.host_syncs(step, CPU)
    assert syncs["count"] == syncs["scalar_reads"] == 1
    (found,) = syncs["where"]
    assert found["phase"] == "forward"
    assert "test_perf_profile.py" in found["at"] and "loss_with_a_read" in found["at"]
    assert found["inside"] == ["aten::item", "forward", "step"], found  # outside the loss label


def test_smoke_run_writes_the_table(sample_data, tmp_path):
    result = bench.main(["--smoke", "--out", str(tmp_path)])
    phases = result["phases"]["ms"]
    assert set(phases) == set(bench.PHASES) | {"step"}
    assert all(phases[p] > 0 for p in (bench.DATA, bench.TOKENIZER, bench.ENCODER))
    assert all(phases[p] > 0 for p in (bench.DECODER, bench.BACKWARD, bench.OPTIMIZER))
    assert sum(phases[p] for p in bench.PHASES) == pytest.approx(phases["step"])
    assert len(result["top_operators"]) == 10
    assert result["tokenizer_ops"]["constant"] and result["host_syncs"]["count"] == 0
    assert result["bands"] == 12
    saved = json.loads((tmp_path / "profile_step.json").read_text())
    assert saved["host_syncs"]["count"] == 0
    table = (tmp_path / "profile_step.md").read_text()
    assert "| tokenizer |" in table and "**Check 1**" in table and "PASS" in table
