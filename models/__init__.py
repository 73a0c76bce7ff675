"""eoforge.models: spectrum-aware tokenizers, ViT encoders, the model registry and the release format."""

from eoforge.models import less, vit  # noqa: F401  (registers the ViT and LESS sizes)
from eoforge.models.channel_groups import ChannelGroupPatchEmbed, MissingBandError
from eoforge.models.dofa import DynamicPatchEmbed
from eoforge.models.less import LessTokens, LessViT
from eoforge.models.registry import create_model, list_models, register_model
from eoforge.models.release import Release, ReleaseError, load_release, save_release, verify_release
from eoforge.models.spectral import SpectrumAwarePatchEmbed, UnsupportedBandError
from eoforge.models.spectral_adapter import SpectralAdapter, SpectralAdapterPatchEmbed
from eoforge.models.vit import SpectralViT

__all__ = [
    "ChannelGroupPatchEmbed",
    "DynamicPatchEmbed",
    "LessTokens",
    "LessViT",
    "MissingBandError",
    "SpectralAdapter",
    "SpectralAdapterPatchEmbed",
    "Release",
    "ReleaseError",
    "SpectralViT",
    "SpectrumAwarePatchEmbed",
    "UnsupportedBandError",
    "create_model",
    "list_models",
    "load_release",
    "register_model",
    "save_release",
    "verify_release",
]
