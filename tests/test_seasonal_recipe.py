"""SeCo as published (Manas et al. 2021): MoCo-v2's augmentations, drawn independently for the
query and the keys and defined for any band set through band groups, and SGD with momentum as a
configurable optimizer that the shipped seasonal_contrast config uses."""

from __future__ import annotations

import pytest
import torch

from eoforge.launch.config import ConfigError, load_config
from eoforge.launch.engine import build_optimizer, param_groups
from eoforge.models import create_model
from eoforge.pretrain.config import PretrainConfig, find_config
from eoforge.pretrain.objectives import validate_objective
from eoforge.pretrain.seasonal_contrast import (
    ColourAugmentation,
    SeasonalContrast,
    band_groups,
    hue_shift,
)

# Sentinel-2's 13 bands: visible B01-B04, red edge and NIR B05-B09, SWIR B10-B12.
S2_NM = torch.tensor(
    [442.7, 492.4, 559.8, 664.6, 704.1, 740.5, 782.8, 832.8, 864.7, 945.1, 1373.5, 1613.7, 2202.4]
)
S1_NM = torch.tensor([5.547e7, 5.547e7])  # VV, VH at C-band
NO_COLOUR = dict(p_jitter=0.0, p_grey=0.0, p_blur=0.0)


def _seco() -> SeasonalContrast:
    torch.manual_seed(0)
    return SeasonalContrast(create_model("vit_test_patch8"), queue_size=16)


@pytest.mark.parametrize("wavelengths", [S2_NM, S1_NM], ids=["s2_13_bands", "s1_2_bands"])
def test_query_and_key_draws_are_independent_and_reusable(wavelengths):
    """Two draws (query, key) give different views of the same images; one draw applied twice
    (SeCo's k1 reuses the query's) gives the same view; both defined for optical and SAR."""
    images = torch.randn(4, wavelengths.shape[0], 32, 32)
    seco = _seco()
    torch.manual_seed(1)
    t_q, t_k = seco.augmentation(4, wavelengths), seco.augmentation(4, wavelengths)
    query, key = t_q(images), t_k(images)
    assert query.shape == key.shape == images.shape
    assert torch.isfinite(query).all() and torch.isfinite(key).all()
    for i in range(4):  # every sample's two views differ
        assert not torch.allclose(query[i], key[i])
    assert torch.equal(t_q(images), query)


def test_colour_groups_bands_by_wavelength():
    groups = band_groups(S2_NM)
    assert groups.tolist() == [0] * 4 + [1] * 6 + [2] * 3
    assert band_groups(S1_NM).unique().numel() == 1
    # Greyscale replaces each band by its group's mean: equal within a group, not across.
    images = torch.randn(2, 13, 16, 16)
    grey = ColourAugmentation.draw(2, S2_NM, **(NO_COLOUR | {"p_grey": 1.0}))(images)
    for members in ([0, 1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11, 12]):
        expected = images[:, members].mean(dim=1)
        assert all(torch.allclose(grey[:, m], expected, atol=1e-5) for m in members)
    assert not torch.allclose(grey[:, 0], grey[:, 10])
    # Without jitter, greyscale or blur the images pass unchanged.
    same = ColourAugmentation.draw(2, S2_NM, **NO_COLOUR)(images)
    assert torch.allclose(same, images, atol=1e-5)


def test_hue_is_a_cyclic_shift_of_a_groups_chroma():
    """A hue of 1/3 turn moves each band of a three-band group onto the next (R -> G -> B), as
    a 120 degree hue rotation of RGB does; single-band groups stay put; hue 0 is the identity."""
    groups = torch.tensor([0, 0, 0, 1])  # a three-band group and a single band
    shift = hue_shift(groups, torch.tensor([1 / 3, 0.0]))  # [2, 4, 4]
    expected = torch.tensor(
        [[0.0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]
    )  # band i takes band i - 1 of its group
    assert torch.allclose(shift[0], expected, atol=1e-6)
    assert torch.allclose(shift[1], torch.eye(4))


def test_sgd_is_a_configurable_optimizer():
    module = torch.nn.Linear(4, 2)
    sgd = build_optimizer(
        "sgd", param_groups(module, 1e-4), lr=0.03, betas=(0.9, 0.95), momentum=0.9
    )
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["lr"] == 0.03
    assert [g["weight_decay"] for g in sgd.param_groups] == [1e-4, 0.0]  # no decay on the bias
    adamw = build_optimizer("adamw", param_groups(module, 0.05), 1e-3, (0.9, 0.95), 0.9)
    assert isinstance(adamw, torch.optim.AdamW)
    with pytest.raises(ConfigError, match="optim.name='lamb'"):
        build_optimizer("lamb", param_groups(module, 0.0), 1e-3, (0.9, 0.95), 0.9)
    cfg = load_config(PretrainConfig, find_config("demo"), ["optim.name=lamb"])
    with pytest.raises(ValueError, match="optim.name='lamb'"):
        cfg.validate()


def test_shipped_seasonal_config_is_secos_recipe():
    cfg = load_config(PretrainConfig, find_config("seasonal_contrast"), ["data.shards=[s]"])
    cfg.validate()
    validate_objective(cfg.objective)
    assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.blr) == ("sgd", 0.9, 0.03)
    assert cfg.optim.weight_decay == 1e-4
    kwargs = cfg.objective.kwargs
    assert [kwargs[k] for k in ("brightness", "contrast", "saturation", "hue")] == [0.4] * 3 + [0.1]
    assert (kwargs["p_jitter"], kwargs["p_grey"]) == (0.8, 0.2)
    SeasonalContrast(create_model("vit_test_patch8"), **(dict(kwargs) | {"queue_size": 16}))
