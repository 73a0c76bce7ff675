"""Both real S1+S2 pair sources, through shards, feed the cross-sensor objectives (mixup, CROMA),
including samples that lack one sensor, which count in no loss term of that sensor."""

from __future__ import annotations

import pytest
import torch
from real_batches import SSL4EO, paired_s1s2_batch
from test_contrastive import _croma
from test_mixup import _mixup

from eoforge.datasets.pairs import build_paired_shards
from eoforge.datasets.reader import ShardStream
from eoforge.datasets.stats import Normaliser, compute_stats


@pytest.mark.parametrize("source", ["bigearthnet", "ssl4eo"])
@pytest.mark.parametrize("make", [_mixup, _croma], ids=["mixup", "croma"])
def test_real_pairs_train_cross_sensor_objectives(sample_data, tmp_path, source, make):
    batch = paired_s1s2_batch(sample_data, tmp_path, source=source, size=32)
    assert {"S2L2A", "S1GRD"} <= set(batch)
    assert batch["S2L2A"]["image"].shape[-2:] == batch["S1GRD"]["image"].shape[-2:]
    objective = make()
    losses = objective(batch)
    assert torch.isfinite(losses["loss"]) and losses["loss"] > 0
    losses["loss"].backward()
    encoder_grads = [p.grad for p in objective.encoder.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in encoder_grads)


def test_ssl4eo_unpaired_dates_arrive_as_missing_sensors(sample_data, tmp_path):
    """With a 7-day window only the June S1/S2 pair forms; the August S2 and September S1 come
    through as samples lacking the other sensor, and the objectives still take the batch."""
    out = tmp_path / "ssl4eo_7d"
    build_paired_shards(
        sample_data / SSL4EO,
        out,
        "S2L2A",
        pair=["S1GRD"],
        layout="ssl4eo",
        time_window_days=7.0,
        tile_size=32,
        progress=False,
    )
    stream = ShardStream(
        out,
        Normaliser.from_file(compute_stats(out, progress=False)),
        batch_size=16,
        shuffle_buffer=1,
        seed=0,
    )
    batches = list(stream.epoch_batches(0))
    s2 = torch.cat([b["S2L2A"]["present"] for b in batches])
    s1 = torch.cat([b["S1GRD"]["present"] for b in batches])
    assert (s2 & s1).any() and (s2 & ~s1).any() and (~s2 & s1).any()
    for batch in batches:
        absent = ~batch["S1GRD"]["present"]
        assert not batch["S1GRD"]["valid"][absent].any()  # an absent sensor holds no valid pixel
    lacking = [b for b in batches if not (b["S1GRD"]["present"] & b["S2L2A"]["present"]).all()]
    for make in (_mixup, _croma):
        for batch in lacking[:2]:
            assert torch.isfinite(make()(batch)["loss"])
