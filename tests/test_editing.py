"""SeFa directions and W+ editing."""

from __future__ import annotations

import pytest
import torch

from gan.editing import apply_direction, layers_for_resolutions, sefa_directions
from tests.conftest import make_tiny_generator


@pytest.fixture
def G():
    return make_tiny_generator(0, 64)


def test_directions_are_orthonormal_and_sorted(G):
    d, ev = sefa_directions(G)
    assert d.shape == (G.w_dim, G.w_dim) and ev.shape == (G.w_dim,)
    torch.testing.assert_close(d @ d.T, torch.eye(G.w_dim), atol=1e-5, rtol=0)
    assert (ev[:-1] >= ev[1:]).all() and (ev >= -1e-6).all()
    d5, ev5 = sefa_directions(G, top_k=5)
    assert d5.shape == (5, G.w_dim)
    torch.testing.assert_close(ev5, ev[:5])


def test_top_direction_moves_the_styles_most(G):
    layers = [G.conv1, *G.convs]
    w = G.mapping(torch.randn(4, G.z_dim, generator=torch.Generator().manual_seed(0)))

    def style_change(d: torch.Tensor) -> float:
        return sum((m.conv.modulation(w + d) - m.conv.modulation(w)).square().sum().item() for m in layers)

    top = sefa_directions(G, top_k=1)[0][0]
    g = torch.Generator().manual_seed(1)
    randoms = [r / r.norm() for r in torch.randn(20, G.w_dim, generator=g)]
    assert style_change(top) > max(style_change(r) for r in randoms)


def test_finds_a_planted_direction(G):
    g = torch.Generator().manual_seed(3)
    planted = torch.randn(G.w_dim, generator=g)
    planted /= planted.norm()
    with torch.no_grad():
        for m in [G.conv1, *G.convs]:
            mod = m.conv.modulation.weight
            sign = torch.randint(0, 2, (mod.shape[0], 1), generator=g) * 2 - 1
            mag = 1 + torch.rand(mod.shape[0], 1, generator=g)
            mod.copy_(4 * sign * mag * planted + 0.3 * torch.randn(mod.shape, generator=g))
    top = sefa_directions(G, top_k=1)[0][0]
    assert abs(torch.dot(top, planted)).item() > 0.99


def test_layer_indices_are_the_ws_indices_the_layers_read(G):
    # Style conv i must be the one that reads ws[:, i]: hook each modulation and compare its input.
    seen = {}
    convs = [G.conv1, *G.convs]
    hooks = [
        m.conv.modulation.register_forward_pre_hook(lambda _mod, args, i=i: seen.setdefault(i, args[0]))
        for i, m in enumerate(convs)
    ]
    ws = torch.randn(1, G.num_ws, G.w_dim)
    G.synthesis(ws)
    for h in hooks:
        h.remove()
    assert all(torch.equal(seen[i], ws[:, i]) for i in range(len(convs)))
    assert len(convs) == G.num_ws - 1
    assert layers_for_resolutions(G, 4, 8) == [0, 1, 2]
    assert layers_for_resolutions(G, 64) == [7, 8]


def test_layer_selection(G):
    coarse, _ = sefa_directions(G, layers_for_resolutions(G, 4, 16), top_k=1)
    fine, _ = sefa_directions(G, layers_for_resolutions(G, 32, 64), top_k=1)
    assert not torch.allclose(coarse.abs(), fine.abs())
    with_rgb, _ = sefa_directions(G, [0, 1], top_k=1, include_torgb=True)
    without, _ = sefa_directions(G, [0, 1], top_k=1)
    assert not torch.allclose(with_rgb.abs(), without.abs())
    with pytest.raises(ValueError, match="no modulated layers"):
        sefa_directions(G, [G.num_ws - 1])  # only a ToRGB reads the last index
    with pytest.raises(ValueError, match="out of range"):
        sefa_directions(G, [G.num_ws])
    with pytest.raises(ValueError, match="top_k"):
        sefa_directions(G, top_k=0)


def test_apply_direction_touches_only_the_chosen_layers(G):
    ws = torch.randn(2, G.num_ws, G.w_dim)
    d = sefa_directions(G, top_k=1)[0][0]
    out = apply_direction(ws, d, 3.0, layers=[2, 3])
    assert out is not ws and torch.equal(ws[:, [0, 1, *range(4, G.num_ws)]], out[:, [0, 1, *range(4, G.num_ws)]])
    torch.testing.assert_close(out[:, [2, 3]], ws[:, [2, 3]] + 3.0 * d)
    per_sample = apply_direction(ws, d, torch.tensor([1.0, -2.0]))
    torch.testing.assert_close(per_sample[1], ws[1] - 2.0 * d)
    torch.testing.assert_close(per_sample[0], ws[0] + d)
    with pytest.raises(ValueError):
        apply_direction(ws[0], d, 1.0)
