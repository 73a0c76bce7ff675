"""Map the ViT trunk (blocks, final norm, cls token) to and from timm's ``vit_*`` models.

The transformer blocks share timm's parameter layout, so weights move one to one. What does
not map is stated, never guessed: timm's RGB patch embedding and learned position table have
no counterpart in the spectrum-aware tokenizer and sincos positions, and eoforge's tokenizer
has none in timm.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

TRUNK_PREFIXES = ("blocks.", "norm.")
CLS_EOFORGE, CLS_TIMM = "cls_token.token", "cls_token"


def _is_trunk(key: str) -> bool:
    return key.startswith(TRUNK_PREFIXES)


def to_timm_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An eoforge ViT state dict -> the trunk entries under timm's names."""
    out = {k: v for k, v in state.items() if _is_trunk(k)}
    out[CLS_TIMM] = state[CLS_EOFORGE]
    return out


def from_timm_state_dict(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A timm ViT state dict -> (eoforge trunk entries, timm keys left out)."""
    out, skipped = {}, []
    for key, value in state.items():
        if _is_trunk(key):
            out[key] = value
        elif key == CLS_TIMM:
            out[CLS_EOFORGE] = value
        else:
            skipped.append(key)
    return out, skipped


def load_timm_trunk(model: torch.nn.Module, timm_state: Mapping[str, torch.Tensor]) -> list[str]:
    """Load a timm ViT's trunk into an eoforge ViT; returns the timm keys that were left out.

    Raises:
        ValueError: if anything besides the tokenizer stays unloaded, or shapes differ.
    """
    trunk, skipped = from_timm_state_dict(timm_state)
    result = model.load_state_dict(trunk, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("patch_embed.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"timm trunk does not fit: missing {missing}, unexpected {result.unexpected_keys}"
        )
    return skipped
