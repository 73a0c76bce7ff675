"""A timm-style model registry: architectures are registered size functions.

``create_model(name, **kwargs)`` builds a registered variant and records the name and kwargs on
the model (``model.arch_name``, ``model.arch_kwargs``) so a release can rebuild it exactly.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a size function under its own name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    _import_sizes()
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name``; kwargs override the size defaults."""
    _import_sizes()
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    model = _MODELS[name](**kwargs)
    model.arch_name = name
    model.arch_kwargs = dict(kwargs)
    return model


def _import_sizes() -> None:
    """The shipped sizes register themselves when their modules are imported; the package
    imports nothing on its own (``eoforge.models``'s docstring)."""
    from eoforge.models import less, vit  # noqa: F401
