"""The registry of labelled evaluation datasets: ``NAME`` -> its adapter, imported on first use.

An adapter is a function ``load(root, *, options...) -> LabelledSplit`` (``eoforge.datasets.
labelled``; Indian Pines returns the ``PixelSplit`` duck type) whose keyword parameters, with their
type annotations and defaults, are the dataset's options: ``dataset_options`` turns them into a
dataclass that callers validate like a config (unknown keys and wrong types name the key). A
parameter ``seed`` is not an option of the dataset: the protocol's seed is passed to it.

Adding a dataset: write the adapter in a module of its own under datasets/, then add one line to
``EVAL_DATASETS``; ``preset`` fixes options of an entry (one adapter can serve several datasets,
as ``change_pairs`` serves ``taizhou`` and ``nanjing``).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, NoneType, UnionType

from eoforge.datasets.errors import DataError


@dataclass(frozen=True)
class Adapter:
    """One registered dataset: ``target`` is ``"package.module:function"``, and ``preset`` the
    options it always passes (they are not options of the dataset)."""

    target: str
    preset: Mapping[str, object] = field(default_factory=dict)


EVAL_DATASETS: Mapping[str, Adapter] = MappingProxyType(
    {
        "indian_pines": Adapter("eoforge.datasets.indian_pines:load_indian_pines"),
        "indian_pines_map": Adapter("eoforge.datasets.indian_pines:load_indian_pines_map"),
        "eurosat": Adapter("eoforge.datasets.eurosat:load_eurosat"),
        "bigearthnet": Adapter("eoforge.datasets.bigearthnet:load_bigearthnet"),
        "change_pairs": Adapter("eoforge.datasets.change_pairs:load_change_pairs"),
        "taizhou": Adapter("eoforge.datasets.change_pairs:load_change_pairs", {"scene": "taizhou"}),
        "nanjing": Adapter("eoforge.datasets.change_pairs:load_change_pairs", {"scene": "nanjing"}),
        "folder_csv": Adapter("eoforge.datasets.folder_csv:load_folder_csv"),
        "torchgeo": Adapter("eoforge.datasets.torchgeo_adapter:load_torchgeo"),
    }
)

# Parameters an adapter takes that are not options a user sets.
NOT_OPTIONS = ("root", "seed")


def adapter(name: str) -> Adapter:
    """The entry of dataset ``name``; an unknown name is a DataError listing the known ones."""
    if name not in EVAL_DATASETS:
        raise DataError(
            f"unknown dataset {name!r}; known datasets: {', '.join(sorted(EVAL_DATASETS))}"
        )
    return EVAL_DATASETS[name]


def dataset_loader(name: str) -> Callable[..., object]:
    """``load(root, **options)`` of dataset ``name`` with its preset options applied (imports
    the adapter's module, so optional dependencies such as lmdb or torchgeo are needed only by
    the datasets that use them)."""
    entry = adapter(name)
    function = _function(entry)

    def load(root: str | Path, **options):
        return function(root, **entry.preset, **options)

    load.__name__ = f"load_{name}"
    load.__doc__ = function.__doc__
    return load


def takes_seed(name: str) -> bool:
    """Whether the split of dataset ``name`` is seeded."""
    return "seed" in inspect.signature(_function(adapter(name))).parameters


def dataset_options(name: str) -> type:
    """A dataclass of the options of dataset ``name``: its adapter's keyword parameters (less
    ``root``, ``seed`` and the preset ones), typed by their annotations, with their defaults
    (``dataclasses.MISSING`` where the adapter has none)."""
    entry = adapter(name)
    function = _function(entry)
    hints = typing.get_type_hints(function)
    fields = []
    for param in inspect.signature(function).parameters.values():
        if param.name in NOT_OPTIONS or param.name in entry.preset:
            continue
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        default = dataclasses.MISSING if param.default is param.empty else param.default
        fields.append(
            (param.name, _config_type(hints.get(param.name, object)), field(default=default))
        )
    return dataclasses.make_dataclass(f"{name}_options", fields, kw_only=True)


def _function(entry: Adapter) -> Callable[..., object]:
    module, function = entry.target.split(":")
    return getattr(importlib.import_module(module), function)


def _config_type(hint) -> object:
    """An annotation as a typed config can check it: ``Sequence[X]`` as ``list[X]``, ``str |
    Path`` as ``str``, ``X | None`` kept; anything else that a config cannot type as ``Any``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (UnionType, typing.Union):
        kept = [a for a in args if a is not NoneType]
        if set(kept) == {str, Path}:
            kept = [str]
        inner = _config_type(kept[0]) if len(kept) == 1 else typing.Any
        return inner | None if NoneType in args and inner is not typing.Any else inner
    if origin in (list, Sequence, tuple) and args:
        return list[_config_type(args[0])]
    if hint in (int, float, bool, str):
        return hint
    return typing.Any
