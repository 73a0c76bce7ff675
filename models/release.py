"""The release format: a self-describing folder that loads without unpickling.

A release folder holds
  ``model.safetensors``  encoder weights,
  ``config.json``        ``{"architecture": registered name, "kwargs": {...}}``,
  ``card.json``          schema version, band table (band_id, sensor, wavelength, bandwidth, gsd),
                         per-band normalisation, objective, data summary, steps, eoforge version,
                         licence and the sha256 of ``model.safetensors``,
  ``README.md``          the human-readable model card.
The folder can be uploaded to a model hub as it is. ``load_release`` is the one way in.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from eoforge.models.registry import create_model

SCHEMA_VERSION = 1
WEIGHTS, CONFIG, CARD, README = "model.safetensors", "config.json", "card.json", "README.md"
REQUIRED_CARD_KEYS = (
    "schema_version",
    "architecture",
    "bands",
    "normalisation",
    "gsd",
    "objective",
    "data",
    "steps",
    "eoforge_version",
    "licence",
    "weights_sha256",
)


class ReleaseError(ValueError):
    """A release folder that is incomplete, inconsistent or asked for bands it cannot serve."""


def eoforge_version() -> str:
    try:
        return version("eoforge")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_release(
    out: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    architecture: str,
    kwargs: Mapping,
    card: Mapping,
) -> Path:
    """Write a release folder atomically (a temporary sibling renamed into place).

    Args:
        out: the release folder to create (replaced if it exists).
        state_dict: encoder weights.
        architecture: registered model name; ``kwargs`` its constructor overrides.
        card: card fields (bands, normalisation, objective, data, steps, licence, ...); the schema
            version, eoforge version, architecture and weights' sha256 are filled in here.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    # One metadata key only: safetensors writes metadata in hash-map order, and the bytes (and so
    # the card's sha256) must not depend on it.
    save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
    (tmp / CONFIG).write_text(
        json.dumps({"architecture": architecture, "kwargs": dict(kwargs)}, indent=2)
    )
    full_card = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "licence": "CC-BY-4.0",
        **card,
        "gsd": card.get("gsd") or finest_gsd(card.get("bands", ())),
        "architecture": {"name": architecture, "kwargs": dict(kwargs)},
        "eoforge_version": eoforge_version(),
        "weights_sha256": sha256_of(tmp / WEIGHTS),
    }
    missing = [k for k in REQUIRED_CARD_KEYS if k not in full_card]
    if missing:
        raise ReleaseError(f"card for {out} lacks {missing}")
    (tmp / CARD).write_text(json.dumps(full_card, indent=2))
    (tmp / README).write_text(render_model_card(full_card))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def finest_gsd(bands: Sequence[Mapping]) -> dict[str, float]:
    """{sensor: its finest band GSD in metres} over the band rows that give one."""
    gsd: dict[str, float] = {}
    for band in bands:
        if band.get("gsd"):
            gsd[band["sensor"]] = min(gsd.get(band["sensor"], band["gsd"]), band["gsd"])
    return gsd


def render_model_card(card: Mapping) -> str:
    """The human-readable README.md of a release, with the YAML front matter model hubs read
    (licence, library, tags), so the folder uploads as it is."""
    arch = card["architecture"]
    objective = card["objective"].get("label") or card["objective"].get("name", "pretrained")
    sensors = sorted({band["sensor"] for band in card["bands"]})
    lines = [
        "---",
        f"license: {str(card['licence']).lower()}",
        "library_name: eoforge",
        "tags:",
        *(f"- {tag}" for tag in ("earth-observation", "remote-sensing", objective, *sensors)),
        "---",
        "",
        f"# {card.get('name', arch['name'])}",
        "",
        f"eoforge release (schema {card['schema_version']}, eoforge {card['eoforge_version']}): "
        f"`{arch['name']}` {_provenance(card)}. Licence: {card['licence']}.",
        "",
        "```python",
        "from eoforge.models import load_release",
        "release = load_release('path/to/this/folder', bands=['S2L2A:B04', 'S2L2A:B08'])",
        "features = release.encoder.forward_features(images, release.band_ids, release.wavelengths)",
        "```",
        "",
        "Inputs must be normalised per band as below: "
        + ("clip to [p1, p99], " if _clipped(card) else "no clipping, ")
        + "scale [p1, p99] to [0, 1], then subtract `mean` and divide by `std`.",
        "",
        "| band_id | wavelength (nm) | bandwidth (nm) | GSD (m) | p1 | p99 | mean | std |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for band in card["bands"]:
        norm = card["normalisation"].get(band["band_id"], {})
        lines.append(
            f"| {band['band_id']} | {band['wavelength']:.1f} | {band['bandwidth']:.1f} | "
            f"{band.get('gsd') or '-'} | {_fmt(norm.get('p1'))} | {_fmt(norm.get('p99'))} | "
            f"{_fmt(norm.get('mean'))} | {_fmt(norm.get('std'))} |"
        )
    data = card["data"]
    lines += [
        "",
        f"GSD (finest band per sensor, m): {json.dumps(card['gsd'])}",
        "",
        f"Data: {json.dumps(data)}",
        "",
        f"Weights sha256: `{card['weights_sha256']}`",
        "",
    ]
    return "\n".join(lines)


def _provenance(card: Mapping) -> str:
    """How the weights came about, for the model card's first line."""
    objective = card["objective"]
    if objective.get("name") == "imported":
        return f"imported from a published {objective.get('source', '?')} checkpoint"
    return f"pretrained with `{objective.get('name', '?')}` for {card['steps']} steps"


def _clipped(card: dict) -> bool:
    """Whether the card's normalisation clips to [p1, p99] (cards without the flag did)."""
    return all(row.get("clip", True) for row in card["normalisation"].values())


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"


@dataclass
class Release:
    """A loaded release: the encoder (eval mode), its card, and the band set it serves."""

    path: Path
    encoder: nn.Module
    card: dict
    band_ids: list[str]
    wavelengths: torch.Tensor  # [C] nm, in band_ids order

    @property
    def normalisation(self) -> dict:
        return self.card["normalisation"]


def verify_release(path: str | Path) -> dict:
    """Check a release folder's files, card schema and weights hash; returns the card."""
    path = Path(path)
    for name in (WEIGHTS, CONFIG, CARD, README):
        if not (path / name).is_file():
            raise ReleaseError(f"release {path} lacks {name}")
    card = json.loads((path / CARD).read_text())
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise ReleaseError(f"{path / CARD} lacks keys {missing}")
    if card["schema_version"] > SCHEMA_VERSION:
        raise ReleaseError(
            f"{path / CARD} has schema {card['schema_version']}; this eoforge reads up to "
            f"{SCHEMA_VERSION}: upgrade eoforge"
        )
    config = json.loads((path / CONFIG).read_text())
    if card["architecture"] != {"name": config["architecture"], "kwargs": config["kwargs"]}:
        raise ReleaseError(
            f"{path}: card.json names architecture {card['architecture']} but config.json builds "
            f"{config['architecture']} with {config['kwargs']}"
        )
    digest = sha256_of(path / WEIGHTS)
    if digest != card["weights_sha256"]:
        raise ReleaseError(
            f"{path / WEIGHTS} has sha256 {digest}, but the card says {card['weights_sha256']}: "
            "the weights were changed or corrupted"
        )
    for band in card["bands"]:
        if band["band_id"] not in card["normalisation"]:
            raise ReleaseError(f"{path / CARD}: band {band['band_id']} has no normalisation entry")
    return card


def load_release(path: str | Path, bands: Sequence[str | Mapping] | None = None) -> Release:
    """Load a release for all its bands or a subset.

    Args:
        path: the release folder.
        bands: None for every band the model was trained on; otherwise band_ids from the card,
            or ``{"band_id": ..., "wavelength": ...}`` mappings for bands the model never saw.
            Unseen bands follow the tokenizer's documented rule (inverse-distance interpolation
            with a warning naming them, or an error naming them); never silent zeros.
    """
    path = Path(path)
    card = verify_release(path)
    config = json.loads((path / CONFIG).read_text())
    encoder = create_model(config["architecture"], **config["kwargs"])
    state = load_file(path / WEIGHTS)  # safetensors: no pickle involved
    encoder.load_state_dict(state, strict=True)
    encoder.eval()
    known = {b["band_id"]: b for b in card["bands"]}
    band_ids, wavelengths, unseen = [], [], []
    for band in bands if bands is not None else list(known):
        if isinstance(band, Mapping):
            band_id, wavelength = band["band_id"], float(band["wavelength"])
        elif band in known:
            band_id, wavelength = band, float(known[band]["wavelength"])
        else:
            raise ReleaseError(
                f"band {band!r} is not in the release {path} (trained on {len(known)} bands, "
                f"e.g. {list(known)[:4]}); pass {{'band_id': ..., 'wavelength': ...}} to embed an "
                "unseen band through the spectral ranges"
            )
        if band_id not in known:
            unseen.append(band_id)
        band_ids.append(band_id)
        wavelengths.append(wavelength)
    if unseen:
        warnings.warn(
            f"release {path.name} was not trained on {len(unseen)} band(s): "
            f"{', '.join(unseen[:8])}{' ...' if len(unseen) > 8 else ''}; they are embedded through "
            "the spectral ranges they fall in or near",
            stacklevel=2,
        )
    wl = torch.tensor(wavelengths, dtype=torch.float32)
    if hasattr(getattr(encoder, "patch_embed", None), "trained_bands"):
        # Hypernetwork tokenizers embed any wavelength; they warn, naming it, for unseen bands.
        encoder.patch_embed.trained_bands = set(known)
    # One patch through the encoder checks the band set now: bands the tokenizer cannot serve
    # fail here, naming them, instead of at the first real batch.
    probe = torch.zeros(1, len(band_ids), encoder.patch_size, encoder.patch_size)
    with torch.no_grad():
        encoder.forward_features(probe, band_ids, wl)
    return Release(path=path, encoder=encoder, card=card, band_ids=band_ids, wavelengths=wl)
