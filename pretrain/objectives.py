"""Objective registry and composition: the config's ``objective`` -> one module around the encoder.

An objective is an ``nn.Module`` built as ``Objective(encoder, **kwargs)`` whose
``forward(batch, preview=False)`` returns ``{"loss": scalar, other detached scalars}`` and owns its
masking, targets, decoders and heads. With ``preview=True`` it returns reconstruction images
(``{sensor: {"input", "masked", "reconstruction", "band_ids", "wavelengths"}}``) or ``{}`` when it
has none. An objective with a schedule defines ``set_progress(fraction)``; the loop calls it with
step / total steps before every step. An objective holding an exponential moving average
(a momentum or target encoder) defines ``after_optimizer_step(full_parameters)``; the loop calls
it once after each optimizer step (not after each micro-batch), with the engine's
``full_parameters`` context, under which ZeRO-3's partitioned parameters read whole.

Several objectives compose as a weighted sum over one shared encoder (``Composite``): each term keeps
its own decoders and heads, the encoder's parameters receive the summed gradient.
"""

from __future__ import annotations

import importlib
from contextlib import nullcontext

import torch
from torch import nn

from eoforge.models.registry import check_options, unknown_choice
from eoforge.pretrain.config import ObjectiveConfig

# name -> "module:Class", imported on first use so a run loads only the objectives it trains.
OBJECTIVES = {
    "mae": "eoforge.pretrain.mae:MAE",
    "selective_mae": "eoforge.pretrain.selective_mae:SelectiveMAE",
    "hyper_mae": "eoforge.pretrain.hyper_mae:HyperMAE",
    "multiscale_mae": "eoforge.pretrain.multiscale_mae:MultiScaleMAE",
    "croma": "eoforge.pretrain.croma:CROMA",
    "seasonal_contrast": "eoforge.pretrain.seasonal_contrast:SeasonalContrast",
    "mixup_mae": "eoforge.pretrain.mixup_mae:MixupMAE",
    "instance_contrast": "eoforge.pretrain.instance_contrast:InstanceContrast",
    "latent_mim": "eoforge.pretrain.latent_mim:LatentMIM",
    "jepa": "eoforge.pretrain.jepa:JEPA",
}


def objective_class(name: str, key: str = "objective.name") -> type[nn.Module]:
    """The class registered under ``name``; an unknown name is an error naming ``key`` and the
    nearest known names."""
    if name not in OBJECTIVES:
        raise unknown_choice(key, name, OBJECTIVES, "objective")
    module, cls = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def check_kwargs(name: str, kwargs: dict, key: str) -> None:
    """Fail before training starts when ``kwargs`` names an option the objective does not take."""
    check_options(objective_class(name), kwargs, key, fixed=("encoder",))


def terms_of(cfg: ObjectiveConfig) -> list[tuple[str, float, dict, str]]:
    """(name, weight, kwargs, config key) per term: ``cfg.terms`` if given, else ``cfg`` itself.

    A term without ``kwargs`` that names ``cfg.name`` takes ``cfg.kwargs``, so a shipped config's
    recipe carries over when it is composed with another objective.
    """
    if not cfg.terms:
        return [(cfg.name, 1.0, dict(cfg.kwargs), "objective.kwargs")]
    terms = []
    for i, term in enumerate(cfg.terms):
        key = f"objective.terms[{i}]"
        unknown = set(term) - {"name", "weight", "kwargs"}
        if unknown or "name" not in term:
            raise ValueError(f"{key}: a term is {{name, weight, kwargs}}; got keys {sorted(term)}")
        kwargs = term.get("kwargs")
        if kwargs is None and term["name"] == cfg.name:
            kwargs, where = cfg.kwargs, "objective.kwargs"
        else:
            where = f"{key}.kwargs"
        terms.append((term["name"], float(term.get("weight", 1.0)), dict(kwargs or {}), where))
    return terms


def objective_label(cfg: ObjectiveConfig) -> str:
    """A short name for run and release names: ``mae``, or ``mae+croma`` for a composition."""
    return "+".join(name for name, *_ in terms_of(cfg))


def validate_objective(cfg: ObjectiveConfig) -> None:
    """Names and options of every term are known (runs before any process group starts)."""
    for i, (name, weight, kwargs, key) in enumerate(terms_of(cfg)):
        objective_class(name, f"objective.terms[{i}].name" if cfg.terms else "objective.name")
        check_kwargs(name, kwargs, key)
        if weight <= 0:
            raise ValueError(f"objective.terms[{i}].weight={weight}: must be > 0")


def build_objective(cfg: ObjectiveConfig, encoder: nn.Module) -> nn.Module:
    """The configured objective, or a ``Composite`` of weighted terms sharing ``encoder``."""
    validate_objective(cfg)
    terms = terms_of(cfg)
    if len(terms) == 1 and terms[0][1] == 1.0:
        name, _, kwargs, _ = terms[0]
        return objective_class(name)(encoder, **kwargs)
    return Composite(
        {
            name: (weight, objective_class(name)(encoder, **kwargs))
            for name, weight, kwargs, _ in terms
        }
    )


class Composite(nn.Module):
    """Weighted sum of objectives over one shared encoder.

    ``loss = sum_i w_i * loss_i``; each term's scalars are reported as ``<term>/<scalar>``. The
    terms are registered under their names, so the encoder's parameters appear once in
    ``parameters()`` (module deduplication) and gather once under ZeRO-3.

    Args:
        terms: {name: (weight, objective)}, all built around the same encoder.
    """

    name = "composite"

    def __init__(self, terms: dict[str, tuple[float, nn.Module]]):
        super().__init__()
        encoders = {id(getattr(obj, "encoder", None)) for _, obj in terms.values()}
        if len(encoders) != 1:
            raise ValueError("composed objectives must share one encoder")
        self.weights = {name: weight for name, (weight, _) in terms.items()}
        self.terms = nn.ModuleDict({name: obj for name, (_, obj) in terms.items()})
        self.encoder = next(iter(self.terms.values())).encoder

    def set_progress(self, fraction: float) -> None:
        for term in self.terms.values():
            if hasattr(term, "set_progress"):
                term.set_progress(fraction)

    def after_optimizer_step(self, full_parameters=nullcontext) -> None:
        for term in self.terms.values():
            if hasattr(term, "after_optimizer_step"):
                term.after_optimizer_step(full_parameters)

    def forward(self, batch: dict, preview: bool = False) -> dict:
        if preview:
            for term in self.terms.values():
                images = term(batch, preview=True)
                if images:
                    return images
            return {}
        out, total = {}, []
        for name, term in self.terms.items():
            losses = term(batch)
            total.append(self.weights[name] * losses["loss"])
            out.update({f"{name}/{k}": v.detach() for k, v in losses.items()})
        out["loss"] = torch.stack(total).sum()
        return out
