"""Two CPU ranks (gloo, torchrun): CROMA's contrastive loss with negatives gathered across ranks
equals the one-process loss on the concatenated batch, and so do its gradients, averaged over
ranks as DDP/ZeRO's all-reduce does: gradients flow back through ``gather_with_grad``. Seasonal
contrast's queues stay identical on every rank.

The test runs this file under torchrun; ``__main__`` below is the per-rank program.
"""

from __future__ import annotations

import sys

import pytest
import torch

from eoforge.models import create_model
from eoforge.pretrain import croma as croma_module
from eoforge.pretrain.croma import CROMA
from eoforge.pretrain.seasonal_contrast import SeasonalContrast

from pretrain_runs import torchrun_script

WORLD = 2
LOCAL = 3  # samples per rank
SIZE = 32
RADARLESS = 4  # global index of the sample without radar: rank 1 holds 2 pairs, rank 0 holds 3

pytestmark = pytest.mark.slow  # two interpreter start-ups: about 20 s


def _smooth(generator, b, c):
    """Smooth images [b, c, SIZE, SIZE]: something an encoder can tell apart."""
    coarse = torch.randn(b, c, SIZE // 8, SIZE // 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear")


def global_batch() -> dict:
    """A paired S2/S1 batch of WORLD * LOCAL samples; sample RADARLESS lacks radar."""
    g = torch.Generator().manual_seed(0)
    b = WORLD * LOCAL
    optical = _smooth(g, b, 4)
    radar = _smooth(g, b, 2)
    present = torch.ones(b, dtype=torch.bool)
    present[RADARLESS] = False
    radar[RADARLESS] = 0.0
    valid_r = torch.ones_like(radar, dtype=torch.bool)
    valid_r[RADARLESS] = False
    return {
        "S2L2A": {
            "image": optical,
            "valid": torch.ones_like(optical, dtype=torch.bool),
            "band_ids": ["S2L2A:B02", "S2L2A:B03", "S2L2A:B04", "S2L2A:B08"],
            "wavelengths": torch.tensor([492.4, 559.8, 664.6, 832.8]).expand(b, -1),
        },
        "S1GRD": {
            "image": radar,
            "valid": valid_r,
            "present": present,
            "band_ids": ["S1GRD:VV", "S1GRD:VH"],
            "wavelengths": torch.full((b, 2), 5.547e7),
        },
        "meta": {},
    }


def rows(batch: dict, index) -> dict:
    return {
        s: {k: (v[index] if torch.is_tensor(v) else v) for k, v in view.items()}
        if s != "meta"
        else view
        for s, view in batch.items()
    }


def build() -> CROMA:
    torch.manual_seed(0)
    return CROMA(
        create_model("vit_test_patch8"),
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=4,
        cross_depth=1,
        proj_dim=16,
    )


def fixed_masking(index):
    """A stand-in for ``random_masking``: rows ``index`` of one global mask, so every sample
    sees the same patches on its rank as in the one-process reference."""
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(WORLD * LOCAL, (SIZE // 8) ** 2, generator=g)[index]
    keep = noise.argsort(dim=1)[:, :4]  # [B, 4] of 16 patches: 75% masked
    mask = torch.ones_like(noise).scatter_(1, keep, 0.0)
    return lambda batch, length, ratio, device: (keep, mask)


def contrastive_and_grads(croma: CROMA, batch: dict) -> tuple[torch.Tensor, dict]:
    loss = croma.losses(batch)["contrastive"]
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in croma.named_parameters() if p.grad is not None
    }


def rank_main(out_path: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    local = slice(rank * LOCAL, (rank + 1) * LOCAL)
    croma_module.random_masking = fixed_masking(local)  # a process of its own
    loss, grads = contrastive_and_grads(build(), rows(global_batch(), local))
    torch.distributed.all_reduce(loss)
    for g in grads.values():
        torch.distributed.all_reduce(g)  # summed over ranks, then / WORLD: DDP's average

    torch.manual_seed(0)  # the same weights and initial queues on every rank, as in training
    seco = SeasonalContrast(create_model("vit_test_patch8"), queue_size=8)
    torch.manual_seed(rank)  # but different seasons and augmentations
    optical = dict(global_batch()["S2L2A"])
    two_seasons = [optical["image"], optical["image"].flip(-1)]
    optical["image"] = torch.stack(two_seasons, dim=1)  # [B, T=2, C, H, W]
    optical["valid"] = torch.ones_like(optical["image"], dtype=torch.bool)
    seco(rows({"S2L2A": optical, "meta": {}}, local))["loss"].backward()
    queue = seco.queues[1].keys.clone()
    others = [torch.empty_like(queue) for _ in range(WORLD)]
    torch.distributed.all_gather(others, queue)
    if rank == 0:
        torch.save(
            {
                "loss": loss / WORLD,
                "grads": {n: g / WORLD for n, g in grads.items()},
                "queues_equal": all(torch.equal(q, queue) for q in others),
                "queue_ptr": int(seco.queues[1].ptr),
            },
            out_path,
        )
    torch.distributed.destroy_process_group()


def test_gathered_contrastive_loss_and_gradients_match_one_process(tmp_path, monkeypatch):
    out = tmp_path / "rank0.pt"
    torchrun_script(__file__, [str(out)], tmp_path, nproc=WORLD, timeout=120)
    ranks = torch.load(out)

    monkeypatch.setattr(croma_module, "random_masking", fixed_masking(slice(None)))
    loss, grads = contrastive_and_grads(build(), global_batch())
    assert loss.item() > 0.1
    assert torch.allclose(ranks["loss"], loss, rtol=1e-5, atol=1e-6)
    assert set(ranks["grads"]) == set(grads)
    encoder = [n for n in grads if n.startswith("encoder.") and grads[n].abs().sum() > 0]
    assert encoder  # the comparison covers the shared encoder, not only the heads
    for name, grad in grads.items():
        error = (ranks["grads"][name] - grad).abs().max()
        assert error <= 1e-5 * grad.abs().max(), name
    # Seasonal contrast: both ranks enqueue every rank's keys (2 x 3 per step) in the same order.
    assert ranks["queues_equal"] and ranks["queue_ptr"] == (WORLD * LOCAL) % 8


if __name__ == "__main__":
    rank_main(sys.argv[1])
