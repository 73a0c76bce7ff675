"""Objective factory: the config's ``objective.name`` -> an objective module around the encoder.

An objective is an ``nn.Module`` whose ``forward(batch)`` returns ``{"loss": ..., other scalars}``
and owns its masking, targets and decoder.
"""

from __future__ import annotations

from torch import nn

from eoforge.pretrain.config import ObjectiveConfig
from eoforge.pretrain.mae import MAE

OBJECTIVES = {"mae": MAE}


def build_objective(cfg: ObjectiveConfig, encoder: nn.Module) -> nn.Module:
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"objective.name={cfg.name!r}: known objectives are {sorted(OBJECTIVES)}")
    return OBJECTIVES[cfg.name](
        encoder,
        mask_ratio=cfg.mask_ratio,
        decoder_dim=cfg.decoder_dim,
        decoder_depth=cfg.decoder_depth,
        decoder_heads=cfg.decoder_heads,
        norm_pix=cfg.norm_pix,
    )
