"""eoforge.models: spectrum-aware tokenizers, ViT encoders, the model registry and the release format.

The names below are imported on first use (PEP 562): importing the package, or a light module of
it such as ``eoforge.models.commands``, does not import torch, so ``eoforge --help`` stays quick.
The registry imports the ViT and LESS sizes before any lookup (``registry.create_model``).
"""

from __future__ import annotations

import importlib

# name -> the module of eoforge.models that defines it
_EXPORTS = {
    "ChannelGroupPatchEmbed": "channel_groups",
    "DynamicPatchEmbed": "dofa",
    "LessTokens": "less",
    "LessViT": "less",
    "MissingBandError": "channel_groups",
    "SpectralAdapter": "spectral_adapter",
    "SpectralAdapterPatchEmbed": "spectral_adapter",
    "Release": "release",
    "ReleaseError": "release",
    "SpectralViT": "vit",
    "SpectrumAwarePatchEmbed": "spectral",
    "UnsupportedBandError": "spectral",
    "create_model": "registry",
    "list_models": "registry",
    "load_release": "release",
    "register_model": "registry",
    "save_release": "release",
    "verify_release": "release",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'eoforge.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"eoforge.models.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
