"""Import published DOFA and SatMAE checkpoints as eoforge encoders and releases.

Both models are MAE-style ViTs whose blocks, final norm and cls token follow timm's layout, so the
trunk moves one to one (``eoforge.models.timm_interop``); their tokenizers are eoforge's ``dofa``
(SPECS T2) and ``channel_groups`` (SPECS T3). What each published key becomes:

DOFA (Xiong et al. 2024; ``dofa_v1.py`` / ``wave_dynamic_layer.py``), layout ``"dofa"``:
  * ``patch_embed.fclayer.*`` -> ``patch_embed.fclayer.*``;
    ``patch_embed.weight_generator.transformer_encoder.layers.0.*`` ->
    ``patch_embed.weight_generator.layer.*``; ``weight_generator.{fc_weight, fc_bias,
    weight_tokens, bias_token}`` keep their names.
  * ``pos_embed`` [1, 1 + N, D] (fixed, never trained) is checked against the 2-D sincos table
    and dropped; its cls row, which DOFA adds to the cls token, is folded into ``cls_token``.
  * ``mask_token``, ``projector.*`` (pretraining), ``decoder_*`` (MAE decoder), ``head.*`` and
    ``fc_norm.*`` (classification head) are not part of the encoder: reported, not loaded.
  * eoforge's ``patch_embed.sar_codes`` has no DOFA counterpart: the imported tokenizer is built
    with no SAR polarisations, so a SAR band given its radar wavelength is refused, naming it.
    DOFA itself embeds every band, SAR included, from a wavelength in micrometres; give a SAR band
    the wavelength its DOFA recipe used (``{"band_id": ..., "wavelength": nm}``) to do the same.
  * Not a weight, but a difference in the tokens: DOFA's convolution pads by one pixel, so its
    patches sit one pixel up and left of the aligned patches eoforge cuts (see
    ``eoforge.models.dofa``). The kernels are DOFA's; the pixels they see are shifted by one.
  * The kernel is reshaped per band ([C, p, p, D] -> [D, C, p, p]), the layout of DOFA's current
    code and weights. DOFA's first ``wave_dynamic_layer`` ``view``ed it straight to
    [D, C, p, p]; weights trained that way load, but their kernels mix bands and cannot be
    reproduced here. The keys do not tell the two apart.
  * DOFA v2 (``model.blocks.*`` with LayerScale ``ls1``/``ls2``) is another layout: its keys are
    refused by name.

SatMAE (Cong et al. 2022; ``models_vit_group_channels.py`` / ``models_mae_group_channels.py``),
layout ``"satmae"``:
  * ``patch_embed.{i}.proj.*`` -> ``patch_embed.embeds.{i}.*``, one Conv2d per band group. The
    groups are those of the tokenizer (default SatMAE's Sentinel-2 groups
    {B2, B3, B4, B8}, {B5, B6, B7, B8A}, {B11, B12}, the bands of SatMAE's ``channel_groups``
    indices (0, 1, 2, 6), (3, 4, 5, 7), (8, 9) into its 10-band input), each in that order.
  * ``pos_embed`` [1, 1 + N, D - Dg] and ``channel_embed`` [1, G, Dg] (fixed) are checked against
    the sincos tables and dropped; Dg becomes the tokenizer's ``group_dim``. The fine-tuning ViT's
    ``channel_cls_embed`` and the cls row of ``pos_embed``, which it adds to the cls token, are
    folded into ``cls_token``; an MAE checkpoint adds nothing to its cls token.
  * ``mask_token``, ``decoder_*``, ``head.*``, ``fc_norm.*``: reported, not loaded.

Positions. eoforge's 2-D sincos puts the row code in the first half of the channels, MAE's (which
both models use) the column code. Where a checkpoint's table is MAE's, the residual stream's
channels are permuted so that it becomes eoforge's: every block, norm, token and tokenizer output
is re-indexed, which changes no computation, and the features come out in that permuted channel
order (``ImportReport.channel_order``: eoforge channel k is the source's channel
``channel_order[k]``). A position table that is not fixed sincos (a learned one) has no
counterpart in eoforge and is refused.

What cannot be read from the weights must be right in ``architecture``: the number of heads (a
wrong one reshapes the attention silently) and the MLP ratio are taken from it as they are.
"""

from __future__ import annotations

import argparse
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from eoforge.models.pos_embed import sincos_1d, sincos_2d
from eoforge.models.registry import create_model
from eoforge.models.release import save_release
from eoforge.models.timm_interop import CLS_EOFORGE, CLS_TIMM, from_timm_state_dict

LAYOUTS = ("dofa", "satmae")
# A fixed table is recomputed here in float64; checkpoints store it in float32 (or less).
TABLE_ATOL = 1e-3
NOT_ENCODER = {
    "mask_token": "MAE mask token (pretraining decoder input), not part of the encoder",
    "projector.": "DOFA pretraining projector, not part of the encoder",
    "decoder_": "MAE decoder, not part of the encoder",
    "head.": "classification head, not part of the encoder",
    "fc_norm.": "norm of the classification head's pooled features, not part of the encoder",
}
IDENTITY_NORMALISATION = {"p1": 0.0, "p99": 1.0, "mean": 0.0, "std": 1.0, "clip": False}


class CheckpointImportError(ValueError):
    """A checkpoint that does not fit the layout or architecture; the message names the keys."""


@dataclass
class ImportReport:
    """What became of every published key.

    Attributes:
        layout: ``"dofa"`` or ``"satmae"``.
        loaded: published key -> eoforge key, for weights loaded (permuted where stated).
        checked: fixed tables verified against sincos and dropped, with what was folded.
        skipped: published key -> why it is not part of the encoder.
        channel_order: eoforge residual channel k is the source's ``channel_order[k]``.
    """

    layout: str
    loaded: dict[str, str] = field(default_factory=dict)
    checked: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    channel_order: list[int] = field(default_factory=list)


# (published pattern, eoforge replacement) and back, for the tokenizer's keys.
_TOKENIZER_NAMES = {
    "dofa": (
        (
            r"patch_embed\.weight_generator\.transformer_encoder\.layers\.0\.",
            "patch_embed.weight_generator.layer.",
        ),
    ),
    "satmae": ((r"patch_embed\.(\d+)\.proj\.", r"patch_embed.embeds.\1."),),
}
_PUBLISHED_NAMES = {
    "dofa": (
        (
            r"patch_embed\.weight_generator\.layer\.",
            "patch_embed.weight_generator.transformer_encoder.layers.0.",
        ),
    ),
    "satmae": ((r"patch_embed\.embeds\.(\d+)\.", r"patch_embed.\1.proj."),),
}
_TOKENIZERS = {"dofa": "dofa", "satmae": "channel_groups"}
# Fixed tables each layout must hold (checked, then dropped); SatMAE's fine-tuning ViT adds an
# optional ``channel_cls_embed`` (folded into the cls token).
_TABLES = {"dofa": ("pos_embed",), "satmae": ("pos_embed", "channel_embed")}
_FOLDED = {"dofa": (), "satmae": ("channel_cls_embed",)}


def _rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        renamed, count = re.subn("^" + pattern, replacement, key)
        if count:
            return renamed
    return key


def published_name(key: str, layout: str) -> str:
    """The published checkpoint's name of an eoforge encoder key."""
    return CLS_TIMM if key == CLS_EOFORGE else _rename(key, _PUBLISHED_NAMES[layout])


def _not_encoder(key: str) -> str | None:
    for prefix, reason in NOT_ENCODER.items():
        if key == prefix or (prefix.endswith((".", "_")) and key.startswith(prefix)):
            return reason
    return None


def _sincos_grid(table: torch.Tensor, key: str) -> int:
    n = table.shape[1] - 1
    side = math.isqrt(n)
    if table.dim() != 3 or table.shape[0] != 1 or side * side != n:
        raise CheckpointImportError(
            f"{key} {tuple(table.shape)} is not a [1, 1 + n*n, D] position table of a square grid"
        )
    return side


def _half_swap(width: int) -> torch.Tensor:
    """Channel order turning MAE's [column ‖ row] sincos into eoforge's [row ‖ column]."""
    return torch.cat([torch.arange(width // 2, width), torch.arange(width // 2)])


def _position_order(table: torch.Tensor, key: str) -> torch.Tensor:
    """[width] channel order mapping a checkpoint's fixed 2-D sincos onto eoforge's table.

    Raises:
        CheckpointImportError: naming ``key`` when the table is neither layout of sincos.
    """
    side, width = _sincos_grid(table, key), table.shape[-1]
    ours = sincos_2d(side, side, width, dtype=torch.float64)  # [N, width]
    theirs = table[0, 1:].to(torch.float64)
    for order in (_half_swap(width), torch.arange(width)):
        if torch.allclose(theirs[:, order], ours, atol=TABLE_ATOL):
            return order
    deviation = (theirs[:, _half_swap(width)] - ours).abs().max().item()
    raise CheckpointImportError(
        f"{key} is not the fixed 2-D sincos table (max deviation {deviation:.3g} from MAE's); a "
        "learned position table has no counterpart in eoforge's sincos positions"
    )


def _check_group_table(table: torch.Tensor, key: str) -> None:
    groups, width = table.shape[-2:]
    ours = sincos_1d(torch.arange(groups), width)  # [G, Dg]
    if table.dim() != 3 or not torch.allclose(table[0].double(), ours, atol=TABLE_ATOL):
        raise CheckpointImportError(
            f"{key} is not SatMAE's fixed group sincos table; a learned group code has no "
            "counterpart in eoforge's channel-group tokenizer"
        )


# Which axis of each eoforge tensor runs over the residual stream's channels.
_RESIDUAL_AXIS: tuple[tuple[str, int | None], ...] = (
    (r"blocks\.\d+\.(norm1|norm2)\.(weight|bias)", 0),
    (r"blocks\.\d+\.(attn\.proj|mlp\.fc2)\.(weight|bias)", 0),
    (r"blocks\.\d+\.(attn\.qkv|mlp\.fc1)\.weight", 1),
    (r"blocks\.\d+\.(attn\.qkv|mlp\.fc1)\.bias", None),
    (r"norm\.(weight|bias)", 0),
    (re.escape(CLS_EOFORGE), -1),
    (r"patch_embed\.embeds\.\d+\.(weight|bias)", 0),
    (r"patch_embed\.weight_generator\.fc_bias\.(weight|bias)", 0),
    (r"patch_embed\.weight_generator\.fc_weight\.(weight|bias)", "kernel"),
    (r"patch_embed\.(fclayer|weight_generator\.layer)\..+", None),
    (r"patch_embed\.(weight_generator\.(weight_tokens|bias_token)|sar_codes)", None),
)


def permute_residual(
    state: Mapping[str, torch.Tensor], order: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Re-index the residual channels of an eoforge ViT state: channel k <- channel order[k].

    LayerNorm, attention and MLP commute with a permutation of their width, so the permuted
    model computes the same function with its features permuted the same way.
    """
    width, out = len(order), {}
    for key, value in state.items():
        axis = next((a for p, a in _RESIDUAL_AXIS if re.fullmatch(p, key)), "unknown")
        if axis == "unknown":
            raise KeyError(f"no rule for permuting the residual channels of {key}")
        if axis == "kernel":  # generated kernel rows [p*p*D(, 128)]: D is the inner axis
            value = value.reshape(-1, width, *value.shape[1:])[:, order].reshape(value.shape)
        elif axis is not None:
            value = value.index_select(axis % value.dim(), order)
        out[key] = value
    return out


def _tokenizer_kwargs(layout: str, state: Mapping[str, torch.Tensor]) -> dict:
    if layout == "dofa":
        return {"sar_polarisations": []}
    if "channel_embed" not in state:
        raise CheckpointImportError("SatMAE checkpoint lacks channel_embed")
    return {"group_dim": int(state["channel_embed"].shape[-1])}


def convert_state_dict(
    state: Mapping[str, torch.Tensor], layout: str, encoder: nn.Module
) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """A published checkpoint -> (eoforge state for ``encoder``, what became of every key).

    Args:
        state: the checkpoint's tensors under their published names.
        layout: ``"dofa"`` or ``"satmae"``.
        encoder: the eoforge encoder the weights are for (built with the layout's tokenizer).

    Raises:
        CheckpointImportError: naming the published keys that are missing, unknown, of the wrong
            shape, or position tables that are not fixed sincos.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; known layouts: {LAYOUTS}")
    report = ImportReport(layout)
    trunk, rest = from_timm_state_dict(state)
    ours, unknown = dict(trunk), []
    for key in rest:
        reason = _not_encoder(key)
        if reason is not None:
            report.skipped[key] = reason
        elif key.startswith("patch_embed."):
            ours[_rename(key, _TOKENIZER_NAMES[layout])] = state[key]
        elif key not in _TABLES[layout] + _FOLDED[layout]:
            unknown.append(key)
    for key in ours:
        report.loaded[published_name(key, layout)] = key

    expected = {k: v for k, v in encoder.state_dict().items() if v.numel()}
    missing = [published_name(k, layout) for k in expected if k not in ours]
    missing += [k for k in _TABLES[layout] if k not in state]
    unknown += [published_name(k, layout) for k in ours if k not in expected]
    if missing or unknown:
        hint = (
            " (DOFA v2 keys: not this layout)"
            if any(k.startswith("model.") for k in unknown)
            else ""
        )
        raise CheckpointImportError(
            f"{layout} checkpoint does not fit {getattr(encoder, 'arch_name', 'the encoder')}: "
            f"missing {missing}, unexpected {unknown}{hint}"
        )
    wrong = [
        f"{published_name(k, layout)} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
        for k, v in ours.items()
        if v.shape != expected[k].shape
    ]
    if wrong:
        raise CheckpointImportError(f"{layout} checkpoint has wrong shapes: {'; '.join(wrong)}")

    width = expected[CLS_EOFORGE].shape[-1]
    spatial = _position_order(state["pos_embed"], "pos_embed")  # [width of the 2-D table]
    order = torch.cat([spatial, torch.arange(len(spatial), width)])
    cls_add = torch.zeros(width)
    if layout == "dofa":
        cls_add += state["pos_embed"][0, 0].float()
        report.checked["pos_embed"] = "fixed 2-D sincos; cls row folded into cls_token"
    else:
        _check_group_table(state["channel_embed"], "channel_embed")
        report.checked["channel_embed"] = "fixed group sincos (group_dim)"
        if "channel_cls_embed" in state:
            cls_add += torch.cat(
                [state["pos_embed"][0, 0], state["channel_cls_embed"][0, 0]]
            ).float()
            report.checked["channel_cls_embed"] = "folded into cls_token"
        report.checked["pos_embed"] = "fixed 2-D sincos" + (
            "; cls row folded into cls_token" if "channel_cls_embed" in state else ""
        )
    ours[CLS_EOFORGE] = ours[CLS_EOFORGE] + cls_add.to(ours[CLS_EOFORGE].dtype)
    # Tensors with no published counterpart and no elements (the dofa tokenizer's SAR codes).
    ours.update({k: v for k, v in encoder.state_dict().items() if not v.numel()})
    report.channel_order = order.tolist()
    return permute_residual(ours, order), report


def import_checkpoint(
    state_dict: Mapping[str, torch.Tensor], layout: str, architecture: str, **kwargs
) -> nn.Module:
    """Build ``architecture`` with the layout's tokenizer and load a published checkpoint into it.

    Args:
        state_dict: the checkpoint's tensors under their published names (a ``{"model": ...}``
            wrapper is unwrapped).
        layout: ``"dofa"`` or ``"satmae"``.
        architecture: a registered ViT (e.g. ``vit_base_patch16`` for DOFA-base and SatMAE-base);
            its depth, width and patch size must match the checkpoint, and its heads the model's.
        **kwargs: constructor overrides; ``tokenizer_kwargs`` add tokenizer options (e.g.
            SatMAE ``groups`` of band names, in the order of the checkpoint's groups).

    Returns:
        The encoder in eval mode, with ``import_report`` (an ``ImportReport``) attached.
    """
    state = unwrap(state_dict)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; known layouts: {LAYOUTS}")
    if "tokenizer" in kwargs and kwargs["tokenizer"] != _TOKENIZERS[layout]:
        raise ValueError(f"layout {layout} needs tokenizer {_TOKENIZERS[layout]!r}")
    tokenizer_kwargs = dict(kwargs.pop("tokenizer_kwargs", None) or {})
    for key, value in _tokenizer_kwargs(layout, state).items():
        if key in tokenizer_kwargs and tokenizer_kwargs[key] != value:
            raise ValueError(
                f"tokenizer option {key}={tokenizer_kwargs[key]!r} contradicts the {layout} "
                f"checkpoint ({key}={value!r})"
            )
        tokenizer_kwargs[key] = value
    kwargs.update(tokenizer=_TOKENIZERS[layout], tokenizer_kwargs=tokenizer_kwargs)
    encoder = create_model(architecture, **kwargs)
    converted, report = convert_state_dict(state, layout, encoder)
    encoder.load_state_dict(converted, strict=True)
    encoder.import_report = report
    return encoder.eval()


def unwrap(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, unwrapping ``{"model": ...}`` / ``{"state_dict": ...}``
    (MAE-style training checkpoints also hold the optimizer, epoch and arguments)."""
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    not_tensors = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointImportError(f"checkpoint entries that are not tensors: {not_tensors[:8]}")
    return dict(checkpoint)


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` with ``weights_only=True``.

    The unpickler of ``weights_only`` builds tensors and plain containers only, so a checkpoint
    that would run code when unpickled is refused. ``argparse.Namespace`` is let through: MAE-style
    training checkpoints (SatMAE's) store their arguments in one, and it only holds values.

    Raises:
        CheckpointImportError: naming the file when it cannot be read this way.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises several types for a refused object
        raise CheckpointImportError(
            f"{path} cannot be loaded with weights_only=True (it holds more than tensors and "
            f"plain containers): {exc}"
        ) from exc
    if not isinstance(checkpoint, Mapping):
        raise CheckpointImportError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    return unwrap(checkpoint)


def _band_rows(bands: Sequence[Mapping]) -> list[dict]:
    rows = []
    for band in bands:
        absent = [k for k in ("band_id", "wavelength", "bandwidth") if k not in band]
        if absent:
            raise ValueError(f"band row {dict(band)} lacks {absent}")
        rows.append({"sensor": band["band_id"].partition(":")[0], **band})
    return rows


def import_release(
    checkpoint: str | Path | Mapping[str, torch.Tensor],
    layout: str,
    out: str | Path,
    *,
    architecture: str,
    bands: Sequence[Mapping],
    normalisation: Mapping[str, Mapping] | None = None,
    name: str | None = None,
    licence: str = "other",
    **kwargs,
) -> Path:
    """Import a published checkpoint and write it as an eoforge release folder.

    Args:
        checkpoint: a checkpoint file (see ``load_checkpoint``) or its state dict.
        layout: ``"dofa"`` or ``"satmae"``.
        out: the release folder to write.
        architecture: registered ViT matching the checkpoint (see ``import_checkpoint``).
        bands: the band table: rows with ``band_id``, ``wavelength`` and ``bandwidth`` (nm), and
            optionally ``gsd`` (m) and ``sensor`` (default: the band_id's prefix).
        normalisation: per band_id ``{p1, p99, mean, std, clip}`` as the source model expects
            its inputs. Default, with a warning naming the bands: the identity
            (``p1=0, p99=1, mean=0, std=1``, no clipping): inputs are fed as they come, so they
            must already be scaled the way the source model was trained.
        name: the release's name (default ``"<layout>-<architecture>"``).
        licence: the source checkpoint's licence (default ``"other"``: see the source).
        **kwargs: constructor overrides for ``import_checkpoint``.

    Returns:
        The release folder. Its card records ``objective = {"name": "imported", "source":
        layout}`` and, under ``data``, the checkpoint and the published keys left out.
    """
    source = str(checkpoint) if isinstance(checkpoint, str | Path) else "state_dict"
    state = load_checkpoint(checkpoint) if isinstance(checkpoint, str | Path) else checkpoint
    encoder = import_checkpoint(state, layout, architecture, **kwargs)
    rows = _band_rows(bands)
    norm = {k: dict(v) for k, v in (normalisation or {}).items()}
    defaulted = [row["band_id"] for row in rows if row["band_id"] not in norm]
    if defaulted:
        warnings.warn(
            f"no normalisation given for {', '.join(defaulted)}: the release feeds them as they "
            "come (identity); pass the normalisation the source model was trained with",
            stacklevel=2,
        )
        norm.update({band_id: dict(IDENTITY_NORMALISATION) for band_id in defaulted})
    report = encoder.import_report
    card = {
        "name": name or f"{layout}-{architecture}",
        "licence": licence,
        "bands": rows,
        "normalisation": norm,
        "objective": {"name": "imported", "source": layout},
        "data": {
            "checkpoint": source,
            "skipped_keys": report.skipped,
            "checked_tables": report.checked,
            "channel_order": report.channel_order,
        },
        "steps": None,
    }
    return save_release(out, encoder.state_dict(), architecture, encoder.arch_kwargs, card)
