"""Merge YAML files and ``key=value`` overrides into a typed dataclass (OmegaConf structured).

launch/ knows nothing of the schema: owners hand their dataclass in. Unknown keys and wrong
types raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that does not fit its schema; the message names the key."""


def load_config(
    schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> T:
    """Defaults of ``schema`` <- YAML at ``path`` <- ``key=value`` overrides, as a ``schema`` object.

    An error names the key and blames where it came from: the YAML file, or the override on the
    command line.
    """
    with _naming_the_key(path):
        merged = OmegaConf.structured(schema)
        if path is not None:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
    # One override at a time, so that an error quotes the override that caused it.
    for item in _key_value_items(overrides):
        with _naming_the_key(f"the command-line override {item!r}"):
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
    with _naming_the_key(path):
        return OmegaConf.to_object(merged)


def config_from(schema: type[T], values: Mapping[str, object], where: str | None = None) -> T:
    """Defaults of ``schema`` <- ``values`` (Python objects), as a ``schema`` object; ``where``
    names their source in errors."""
    with _naming_the_key(where):
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), dict(values)))


def key_values(items: Sequence[str]) -> dict[str, object]:
    """``key=value`` items of a command line -> {key: value}, values read as YAML scalars or
    lists (``8`` an int, ``[0.3, 1]`` a list, ``null`` None)."""
    with _naming_the_key(None):
        return OmegaConf.to_container(OmegaConf.from_dotlist(_key_value_items(items, "option")))


def _key_value_items(items: Sequence[str], kind: str = "override") -> list[str]:
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{kind} {item!r} is not of the form key=value")
    return list(items)


@contextmanager
def _naming_the_key(where: str | Path | None) -> Iterator[None]:
    """OmegaConf's errors as one-line ConfigErrors naming the key (and ``where``, when given),
    without the lines OmegaConf adds about its own types (full_key, reference_type, ...)."""
    try:
        yield
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        place = f" in {where}" if where else ""
        message = str(getattr(err, "msg", err)).splitlines()[0]
        raise ConfigError(f"config key {key!r}{place}: {message}") from err


def save_config(config, path: str | Path) -> None:
    """Write a config object as YAML."""
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
