"""LESS ViT: the low-rank attention equals its Kronecker form, masks do what the docstrings say,
band order is only a permutation, and the encoder runs on real EnMAP cubes with nodata bands."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math

import numpy as np
import pytest
import torch

from eoforge.models import less
from eoforge.models.registry import create_model, list_models

from conftest import REPO_ROOT

WIDTHS = {
    "less_test_patch8": 48,
    "less_tiny_patch8": 192,
    "less_small_patch8": 384,
    "less_base_patch8": 768,
    "less_large_patch8": 1024,
}


def _bands(c: int, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    wavelengths = torch.sort(torch.rand(c, generator=torch.Generator().manual_seed(seed)))[0]
    return [f"HSI:B{i:03d}" for i in range(c)], 400.0 + 2000.0 * wavelengths


@pytest.fixture(scope="module")
def model() -> less.LessViT:
    torch.manual_seed(0)
    return create_model("less_test_patch8").eval()


@pytest.mark.parametrize("c, n", [(4, 6), (6, 3)])
def test_recombination_equals_kronecker_form(c, n):
    """One head: attn(x) = proj(((1/r) sum_r A_C^r (x) A_S^r)(V_C (x) V_S)) built with torch.kron."""
    torch.manual_seed(0)
    attn = less.LessAttention(dim=12, num_heads=1, k=3, rank=2).double()  # d_c=3, d_s=4
    # c, n include the cls row and column.
    x = torch.randn(1, c, n, 12, dtype=torch.float64)
    spectral = attn.pool_c(x)[0]  # X_C [C+1, d_c]
    spatial = attn.pool_s(x)[0]  # X_S [N+1, d_s]

    def maps(branch, z):
        d = z.shape[-1]
        q, k = branch.qk(z).reshape(len(z), 2, branch.rank, d).unbind(1)  # [L, r, d] each
        a = [torch.softmax(q[:, i] @ k[:, i].T / math.sqrt(d), -1) for i in range(branch.rank)]
        return a, branch.v(z)

    a_c, v_c = maps(attn.spectral, spectral)
    a_s, v_s = maps(attn.spatial, spatial)
    combined = sum(torch.kron(ac, as_) for ac, as_ in zip(a_c, a_s, strict=True)) / attn.rank
    assert torch.allclose(combined.sum(-1), torch.ones(c * n, dtype=torch.float64))
    y = combined @ torch.kron(v_c, v_s)  # [(C+1)(N+1), d_c*d_s], rows c-major
    expected = attn.proj(y.reshape(1, c, n, 12))
    torch.testing.assert_close(attn(x), expected, atol=1e-12, rtol=1e-10)


def test_recombination_gradients_match_finite_differences():
    """The hand-written backward (z rebuilt, not saved) against numerical gradients."""
    g = torch.Generator().manual_seed(0)
    spectral = torch.randn(2, 2, 3, 4, 2, generator=g, dtype=torch.float64)  # [B, H, r, C+1, k]
    spatial = torch.randn(2, 2, 3, 5, 3, generator=g, dtype=torch.float64)  # [B, H, r, N+1, j]
    weight = torch.randn(12, 2, 2, 3, generator=g, dtype=torch.float64)  # [D, H, k, j]
    inputs = tuple(t.requires_grad_() for t in (spectral, spatial, weight))
    assert torch.autograd.gradcheck(less.Recombine.apply, inputs)
    expected = torch.einsum("bhrci,bhrnj,ohij->bcno", *inputs)
    torch.testing.assert_close(less.Recombine.apply(*inputs), expected)


def test_perception_field_blocks_exactly_the_pairs_beyond_the_radius():
    grid_h, grid_w, p = 5, 11, 8
    gsd = torch.tensor([30.0, 10.0], dtype=torch.float64)  # 240 m and 80 m between patches
    positions = less.patch_positions(grid_h, grid_w, gsd * p)
    field = less.perception_field(positions, 640.0)  # [B, N+1, N+1]
    cells = list(itertools.product(range(grid_h), range(grid_w)))
    for b, g in enumerate(gsd.tolist()):
        brute = torch.tensor([[math.dist(i, j) * p * g <= 640.0 for j in cells] for i in cells])
        assert torch.equal(field[b, 1:, 1:], brute)
        assert field[b, 0].all() and field[b, :, 0].all()  # the cls position is never masked
    assert not field[0].all() and field[1, 1, 1 + 8]  # 8 patches * 80 m = 640 m: on the edge

    # In the spatial branch a key outside the field cannot reach a query; the cls sees it.
    torch.manual_seed(0)
    branch = less.LowRankAttention(dim=8, num_heads=2, rank=3)
    tokens = torch.randn(2, len(cells) + 1, 8)
    far = len(cells)  # the last patch, beyond 640 m of the first ones at 30 m GSD
    moved = tokens.clone()
    moved[:, far] += torch.randn(8)
    changed = (branch(tokens, field) - branch(moved, field)).abs().amax((1, 2, 4)) > 0  # [B, N+1]
    assert torch.equal(changed, field[:, :, far])


def test_cls_row_column_and_corner(model):
    ids, wl = _bands(5)
    tokens = model.tokenize(torch.randn(2, 5, 16, 48), ids, wl)  # 2 x 6 patches, 240 m apart
    assert tokens.tokens.shape == (2, 5, 12, 48)
    out = model.encode(tokens)
    assert out.shape == (2, 6, 13, 48)  # [B, C+1, N+1, D]

    # Pooling: row c (including the cls channel, c = 0) is queried by its cls-position entry,
    # column n (including the cls position, n = 0) by its cls-channel entry.
    # Reduce x_r = Linear(x), then softmax((W_q x_r,cls) . x_r / sqrt(d)) over the row / column,
    # written out here in the order the spec states it.
    x = torch.randn(2, 6, 7, 16)
    pool_c, pool_s = less.AttentionPool(16, 8, dim=2), less.AttentionPool(16, 8, dim=1)
    x_c, x_s = pool_c(x), pool_s(x)
    for c in range(6):
        row = pool_c.reduce(x[:, c])  # [B, N+1, d]
        query = pool_c.query(row[:, 0])[:, :, None]  # [B, d, 1]
        weights = torch.softmax(row @ query / math.sqrt(8), dim=1)  # [B, N+1, 1]
        torch.testing.assert_close(x_c[:, c], (weights * row).sum(1))
    for n in range(7):
        column = pool_s.reduce(x[:, :, n])  # [B, C+1, d]
        weights = torch.softmax(
            column @ pool_s.query(column[:, 0, :, None].mT).mT / math.sqrt(8), 1
        )
        torch.testing.assert_close(x_s[:, n], (weights * column).sum(1))

    # The global cls hears every patch token (through both branches); perturbing one token
    # the perception field keeps 1200 m away from patch 0 still moves the corner.
    moved = less.LessTokens(tokens.tokens.clone(), tokens.wavelengths, tokens.positions)
    moved.tokens[:, 3, -1] += torch.randn(48)  # not a constant: LayerNorm would remove that
    assert (model.encode(moved)[:, 0, 0] - out[:, 0, 0]).abs().amax() > 1e-4


def test_permuting_bands_permutes_channel_outputs(model):
    ids, wl = _bands(7)
    images = torch.randn(2, 7, 16, 16)
    valid = torch.rand(2, 7, 16, 16) > 0.2
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    with torch.no_grad():
        out = model(images, ids, wl, valid=valid)
        permuted = model(images[:, perm], [ids[i] for i in perm], wl[perm], valid=valid[:, perm])
    for key in ("channels", "patches"):
        torch.testing.assert_close(permuted[key], out[key][:, perm], atol=1e-5, rtol=1e-4)
    for key in ("cls", "positions"):
        torch.testing.assert_close(permuted[key], out[key], atol=1e-5, rtol=1e-4)


def test_dropping_bands_and_masking_by_index(model):
    ids, wl = _bands(6)
    images = torch.randn(2, 6, 16, 16)
    with torch.no_grad():
        out = model(images, ids, wl, gsd=torch.tensor([30.0, 10.0]))
        fewer = model(images[:, 1:], ids[1:], wl[1:], gsd=torch.tensor([30.0, 10.0]))
        assert fewer["cls"].shape == out["cls"].shape
        assert fewer["positions"].shape == out["positions"].shape
        assert fewer["channels"].shape == (2, 5, 48)

        # Tokens depend on their own band only, so keeping bands by index equals dropping them.
        tokens = model.tokenize(images, ids, wl, gsd=torch.tensor([30.0, 10.0]))
        keep = torch.tensor([[1, 2, 3, 4, 5]] * 2)
        torch.testing.assert_close(model.encode(tokens, keep_channels=keep)[:, 0, 0], fewer["cls"])

        keep_pos = torch.tensor([[0, 3], [2, 1]])
        kept = tokens.select(keep_channels=keep, keep_positions=keep_pos)
        assert torch.equal(kept.positions[1], tokens.positions[1, [2, 1]])
        assert torch.equal(kept.tokens[1], tokens.tokens[1, 1:][:, [2, 1]])
        assert model.encode(tokens, keep, keep_pos).shape == (2, 6, 3, 48)


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_every_parameter_gets_a_gradient(grad_checkpointing):
    torch.manual_seed(0)
    m = create_model("less_test_patch8", grad_checkpointing=grad_checkpointing)
    ids, wl = _bands(4)
    out = m(torch.randn(2, 4, 16, 16), ids, wl, valid=torch.rand(2, 4, 16, 16) > 0.3)
    sum(v.square().mean() for v in out.values()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_autocast_trains_with_fp32_weights_and_follows_fp32():
    """Under bf16 autocast (the GPU default's compute) the recombination's backward, which runs
    outside autocast, gets its inputs in one dtype; outputs and gradients stay within bf16's
    rounding of the fp32 pass, and every weight gradient is fp32."""
    torch.manual_seed(0)
    m = create_model("less_test_patch8")
    ids, wl = _bands(4)
    images, valid = torch.randn(2, 4, 16, 16), torch.rand(2, 4, 16, 16) > 0.3
    grads = {}
    for autocast in (False, True):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m(images, ids, wl, valid=valid)
        sum(v.float().square().mean() for v in out.values()).backward()
        grads[autocast] = {n: p.grad.clone() for n, p in m.named_parameters()}
    for name, grad in grads[True].items():
        assert grad.dtype == torch.float32, name
    flat = {a: torch.cat([g.flatten() for g in grads[a].values()]) for a in grads}
    assert torch.linalg.vector_norm(flat[True] - flat[False]) < 0.05 * torch.linalg.vector_norm(
        flat[False]
    )
    assert not torch.equal(flat[True], flat[False])  # the matmuls did run in bf16


@pytest.mark.parametrize("name", sorted(WIDTHS))
def test_every_registered_less_model_builds(name):
    assert name in list_models()
    ids, wl = _bands(3)
    with torch.device("meta"):  # no memory for the large sizes; shapes and structure only
        m = create_model(name)
        out = m(torch.zeros(1, 3, 16, 16), ids, wl)
    assert m.embed_dim == WIDTHS[name] and m.patch_size == 8
    assert out["cls"].shape == (1, WIDTHS[name]) and out["patches"].shape == (1, 3, 4, WIDTHS[name])


def _enmap_crops(root, size: int = 32) -> torch.Tensor:
    rasterio = pytest.importorskip("rasterio")
    paths = sorted((root / "hyspecnet11k_enmap").glob("*/*-SPECTRAL_IMAGE.TIF"))
    assert len(paths) == 2, paths
    crops = []
    for path in paths:
        with rasterio.open(path) as src:
            crops.append(src.read(window=rasterio.windows.Window(40, 40, size, size)))
    return torch.from_numpy(np.stack(crops))  # [2, 224, size, size] int16


def test_encoder_on_real_enmap_with_nodata(sample_data, model):
    from eoforge.datasets.sensors import get_sensor

    sensor = get_sensor("ENMAP")
    raw = _enmap_crops(sample_data)
    # EnMAP L2A stores the water-vapour absorption bands as nodata everywhere; add a scan-edge
    # gap over every band (one whole patch and part of the next) so empty and partial patches
    # are exercised too.
    raw[:, :, :8, :11] = sensor.nodata
    valid = raw != sensor.nodata  # [B, 224, H, W]
    empty = ~valid.flatten(2).any(2).all(0)  # bands with no valid pixel in either crop
    assert 0 < int(empty.sum()) < 224
    images = raw.float() * sensor.scale
    ids = [band.band_id for band in sensor.bands]
    wl = torch.tensor([band.wavelength for band in sensor.bands])

    with torch.no_grad():
        out = model(images, ids, wl, gsd=30.0, valid=valid)
        assert all(torch.isfinite(v).all() for v in out.values())
        # Zeroed before projection: what the file holds under the mask does not matter.
        noisy = images.masked_fill(~valid, 0.0) + torch.randn_like(images) * (~valid)
        torch.testing.assert_close(model(noisy, ids, wl, gsd=30.0, valid=valid)["cls"], out["cls"])
        # Left out of attention: the empty bands change no other output.
        kept = torch.nonzero(~empty).squeeze(1)
        dropped = model(images[:, kept], [ids[i] for i in kept], wl[kept], valid=valid[:, kept])
    for key in ("cls", "positions"):
        torch.testing.assert_close(dropped[key], out[key], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dropped["channels"], out["channels"][:, kept], atol=1e-4, rtol=1e-4)


def test_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "less_attention", REPO_ROOT / "perf" / "less_attention.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--smoke", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "less_attention.json").read_text())
    assert result["cells"] and all(
        cell["less"]["time_s"] > 0 and cell["less"]["peak_bytes"] > 0 and cell["full"]["time_s"] > 0
        for cell in result["cells"]
    )
    flops = {(cell["C"], cell["N"]): cell["less"]["flops"] for cell in result["cells"]}
    assert flops[(6, 16)] > flops[(3, 16)] > flops[(3, 4)] > 0
    assert {"linear_pass", "leaner_pass", "faster_pass"} <= set(result["gate"])
    assert (tmp_path / "less_attention.md").read_text().count("|") > 10
    assert (tmp_path / "less_attention.png").stat().st_size > 0


@pytest.mark.parametrize("with_valid", [False, True])
def test_grid_field_equals_the_dense_perception_field(with_valid):
    """Window offsets on the whole grid give the dense [N+1, N+1] mask's attention, per sample."""
    torch.manual_seed(0)
    grid_h, grid_w, p = 6, 7, 8
    spacing = torch.tensor([30.0, 10.0], dtype=torch.float64) * p  # 240 m and 80 m
    dense = less.perception_field(less.patch_positions(grid_h, grid_w, spacing), 640.0)
    local = less.grid_field((grid_h, grid_w), spacing, 640.0)
    attn = less.LessAttention(dim=16, num_heads=2, k=2, rank=3).double()
    x = torch.randn(2, 4, grid_h * grid_w + 1, 16, dtype=torch.float64)
    valid = None
    if with_valid:
        valid = torch.rand(2, 3, grid_h * grid_w) > 0.3  # [B, C, N], some patches empty
        valid[:, :, 5] = False
        valid = less._with_summaries(valid)
    torch.testing.assert_close(attn(x, valid, local), attn(x, valid, dense))
    assert local.allowed[0].sum() < local.allowed[1].sum()  # 240 m patches reach fewer offsets


def test_encoder_uses_the_grid_field_on_whole_grids_only(model):
    """Encoding all patches goes through the GridField; a position subset through the dense mask;
    both agree with the dense path on the same tokens."""
    ids, wl = _bands(5)
    images = torch.randn(2, 5, 48, 48)
    tokens = model.tokenize(images, ids, wl, gsd=10.0)
    assert tokens.grid == (6, 6)
    full = model.encode(tokens)
    dense_tokens = dataclasses.replace(tokens, grid=None)  # forces the dense mask
    torch.testing.assert_close(full, model.encode(dense_tokens), atol=1e-5, rtol=1e-4)
    keep = torch.tensor([[0, 3, 9, 20], [1, 2, 30, 35]])
    assert tokens.select(keep_positions=keep).grid is None
    assert tokens.select(keep_channels=torch.tensor([[0, 2], [1, 4]])).grid == (6, 6)
