"""A timm-style model registry: architectures are registered size functions.

``create_model(name, **kwargs)`` builds a registered variant and records the name and kwargs on
the model (``model.arch_name``, ``model.arch_kwargs``) so a release can rebuild it exactly.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Callable, Collection, Mapping

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


def check_model(name: str, kwargs: Mapping[str, object], key: str = "model") -> None:
    """Fail before anything is built when ``name`` is not registered or ``kwargs`` names an
    option its architecture does not take (checked against the constructor's signature, and by
    the architecture's own ``check_options(kwargs, key)`` where it has one, e.g. the tokenizer).

    Raises:
        ValueError: one line naming ``key.name`` or ``key.kwargs.<option>``, the value and the
            nearest valid choices.
    """
    _import_sizes()
    if name not in _MODELS:
        raise unknown_choice(f"{key}.name", name, _MODELS, "model")
    # Size functions take **kwargs; their return annotation names the class they build (one
    # registered without it is checked when it is built).
    arch = typing.get_type_hints(_MODELS[name]).get("return")
    if not isinstance(arch, type):
        return
    check_options(arch, kwargs, f"{key}.kwargs")
    if hasattr(arch, "check_options"):
        arch.check_options(kwargs, f"{key}.kwargs")


def check_options(
    cls: type, kwargs: Mapping[str, object], key: str, fixed: Collection[str] = ()
) -> None:
    """Every option in ``kwargs`` is a parameter of ``cls``'s constructor (other than ``fixed``,
    which the caller passes itself).

    Raises:
        ValueError: naming ``key.<option>`` and the nearest parameters.
    """
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p not in ("self", *fixed)]
    for option in kwargs:
        if option not in accepted:
            raise unknown_choice(
                f"{key}.{option}", kwargs[option], accepted, f"option of {cls.__name__}", option
            )


def unknown_choice(
    key: str, value: object, choices: Collection[str], what: str, typed: str | None = None
) -> ValueError:
    """The one-line error for a ``value`` of ``key`` that is none of ``choices``: it names the
    nearest choices to ``typed`` (default: the value), then all of them when they are few."""
    typed = str(value) if typed is None else typed
    near = difflib.get_close_matches(typed, list(choices), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    listed = sorted(choices)
    known = ", ".join(listed) if len(listed) <= 12 else f"{', '.join(listed[:12])}, ..."
    return ValueError(f"{key}={value!r}: unknown {what}; {hint}known: {known}")


def _import_sizes() -> None:
    """The shipped sizes register themselves when their modules are imported; the package
    imports nothing on its own (``eoforge.models``'s docstring)."""
    from eoforge.models import less, vit  # noqa: F401
