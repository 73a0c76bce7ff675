"""Objective registry and composition: names and options checked up front, weighted sums."""

from __future__ import annotations

import pytest
import torch
from test_mae import _batch

from eoforge.models import create_model
from eoforge.pretrain.config import ObjectiveConfig
from eoforge.pretrain.jepa import JEPA
from eoforge.pretrain.mae import MAE
from eoforge.pretrain.objectives import Composite, build_objective, terms_of, validate_objective


def test_unknown_objective_names_the_nearest_ones():
    with pytest.raises(ValueError, match="objective.name='mea'.*did you mean mae"):
        validate_objective(ObjectiveConfig(name="mea"))
    terms = [{"name": "mae"}, {"name": "crma"}]
    with pytest.raises(ValueError, match=r"objective.terms\[1\].name='crma'.*did you mean croma"):
        validate_objective(ObjectiveConfig(terms=terms))


def test_unknown_option_is_named_with_its_key():
    with pytest.raises(ValueError, match=r"objective.kwargs.mask_ration"):
        validate_objective(ObjectiveConfig(name="mae", kwargs={"mask_ration": 0.5}))
    terms = [{"name": "mae", "weight": 1.0, "kwargs": {"decoder_width": 8}}]
    with pytest.raises(ValueError, match=r"objective.terms\[0\].kwargs.decoder_width"):
        validate_objective(ObjectiveConfig(terms=terms))


def test_malformed_terms_are_refused():
    with pytest.raises(ValueError, match=r"objective.terms\[0\]: a term is"):
        validate_objective(ObjectiveConfig(terms=[{"name": "mae", "wieght": 2}]))
    with pytest.raises(ValueError, match=r"objective.terms\[0\].weight=0.0"):
        validate_objective(ObjectiveConfig(terms=[{"name": "mae", "weight": 0}]))


def test_single_objective_is_built_plain():
    cfg = ObjectiveConfig(name="mae", kwargs={"decoder_dim": 32, "decoder_depth": 1})
    objective = build_objective(cfg, create_model("vit_test_patch8"))
    assert isinstance(objective, MAE) and objective.decoder_dim == 32


def test_composite_is_the_weighted_sum_over_one_encoder():
    torch.manual_seed(0)
    encoder = create_model("vit_test_patch8")
    small = dict(decoder_dim=32, decoder_depth=1, decoder_heads=4)
    composite = Composite({"a": (1.0, MAE(encoder, **small)), "b": (0.5, MAE(encoder, **small))})
    encoder_params = {id(p) for p in encoder.parameters()}
    all_params = [id(p) for p in composite.parameters()]
    assert len(all_params) == len(set(all_params))  # the shared encoder is counted once
    assert encoder_params <= set(all_params)

    out = composite(_batch())
    expected = out["a/loss"] + 0.5 * out["b/loss"]
    assert torch.allclose(out["loss"], expected)
    assert {"a/loss/S2L2A", "b/loss/S2L2A"} <= set(out)
    out["loss"].backward()
    assert all(p.grad is not None for p in composite.parameters())


def test_composite_refuses_separate_encoders():
    small = dict(decoder_dim=32, decoder_depth=1, decoder_heads=4)
    a = MAE(create_model("vit_test_patch8"), **small)
    b = MAE(create_model("vit_test_patch8"), **small)
    with pytest.raises(ValueError, match="share one encoder"):
        Composite({"a": (1.0, a), "b": (1.0, b)})


def test_a_term_naming_the_config_objective_inherits_its_options():
    cfg = ObjectiveConfig(
        name="mae",
        kwargs={"decoder_dim": 48},
        terms=[{"name": "mae", "weight": 1.0}, {"name": "croma", "weight": 0.5}],
    )
    terms = {name: (weight, kwargs) for name, weight, kwargs, _ in terms_of(cfg)}
    assert terms == {"mae": (1.0, {"decoder_dim": 48}), "croma": (0.5, {})}


def test_composite_passes_the_optimizer_step_hook_to_its_terms():
    torch.manual_seed(0)
    encoder = create_model("vit_test_patch8")
    mae = MAE(encoder, decoder_dim=32, decoder_depth=1, decoder_heads=4)
    jepa = JEPA(encoder, predictor_dim=32, predictor_depth=1, predictor_heads=4, momentum=0.5)
    composite = Composite({"mae": (1.0, mae), "jepa": (0.5, jepa)})
    before = jepa.target_encoder.blocks[0].attn.qkv.weight.clone()
    with torch.no_grad():
        encoder.blocks[0].attn.qkv.weight.add_(1.0)
    composite.after_optimizer_step()
    assert torch.allclose(jepa.target_encoder.blocks[0].attn.qkv.weight, before + 0.5)
