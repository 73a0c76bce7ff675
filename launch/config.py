"""Merge YAML files and ``key=value`` overrides into a typed dataclass (OmegaConf structured).

launch/ knows nothing of the schema: owners hand their dataclass in. Unknown keys and wrong
types raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """Defaults of ``schema`` <- YAML at ``path`` <- ``key=value`` overrides, as a ``schema`` object."""
    merged = OmegaConf.structured(schema)
    try:
        if path is not None:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        where = f" in {path}" if path else ""
        raise ConfigError(
            f"config key {key!r}{where}: {err.msg if hasattr(err, 'msg') else err}"
        ) from err


def save_config(config, path: str | Path) -> None:
    """Write a config object as YAML."""
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
