"""eoforge.models: spectrum-aware tokenizers, ViT encoders, the model registry and the release format."""

from eoforge.models import vit  # noqa: F401  (registers the ViT sizes)
from eoforge.models.registry import create_model, list_models, register_model
from eoforge.models.release import Release, ReleaseError, load_release, save_release, verify_release
from eoforge.models.spectral import SpectrumAwarePatchEmbed, UnsupportedBandError
from eoforge.models.vit import SpectralViT

__all__ = [
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
