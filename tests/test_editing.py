"""Latent-space editing: SeFa and GANSpace directions, layer groups, named directions and their files, style
mixing, interpolation, blend sweeps."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from gan.checkpoints import load_generator
from gan.editing import (
    DirectionsError,
    DirectionSet,
    DirectionsMismatchError,
    NamedDirection,
    animation_bytes,
    apply_direction,
    blend_sweep_frames,
    direction_scales,
    directions_meta,
    ganspace_directions,
    interpolate,
    layer_group,
    layer_styles,
    layers_for_resolutions,
    load_directions,
    mix_styles,
    name_direction,
    parse_layers,
    register_directions,
    sample_w,
    save_animation,
    save_directions,
    seed_latents,
    sefa_directions,
    style_directions_path,
)
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


# ------------------------------------------------------------------------------------------------------------
# GANSpace, layer groups, named directions and their files, mixing, interpolation, sweeps (issue 14)

DEMO = Path(__file__).resolve().parents[1] / "gan" / "demo_models"


@pytest.fixture(scope="module")
def demo_base():
    return load_generator(DEMO / "base.safetensors")


@pytest.fixture(scope="module")
def demo_toon():
    return load_generator(DEMO / "toon.safetensors")


def test_ganspace_directions_are_unit_orthogonal_and_explain_decreasing_variance(demo_base):
    G = demo_base
    d, var = ganspace_directions(G, n_samples=4000, top_k=8, seed=0)
    assert d.shape == (8, G.w_dim) and var.shape == (8,)
    torch.testing.assert_close(d @ d.T, torch.eye(8), atol=1e-5, rtol=0)
    assert (var[:-1] >= var[1:]).all() and (var > 0).all()
    # The explained variance is the variance of the sampled W along each component ...
    w = sample_w(G, 4000, seed=0)
    torch.testing.assert_close((w @ d.T).var(0), var, rtol=1e-3, atol=0)
    torch.testing.assert_close(direction_scales(G, d, n_samples=4000, seed=0), var.sqrt(), rtol=1e-3, atol=0)
    # ... more than along any random unit direction, and the leftover is orthogonal to the top component.
    g = torch.Generator().manual_seed(5)
    randoms = torch.randn(50, G.w_dim, generator=g)
    randoms /= randoms.norm(dim=1, keepdim=True)
    assert var[0] > (w @ randoms.T).var(0).max()
    # Seeded: the same seed gives the same basis, signs included.
    d2, var2 = ganspace_directions(G, n_samples=4000, top_k=8, seed=0)
    assert torch.equal(d, d2) and torch.equal(var, var2)
    with pytest.raises(ValueError, match="top_k"):
        ganspace_directions(G, top_k=0)
    with pytest.raises(ValueError, match="at least 2"):
        ganspace_directions(G, n_samples=1)


def test_ganspace_finds_a_planted_axis_of_variation():
    G = make_tiny_generator(0, 32)
    planted = torch.zeros(G.w_dim)
    planted[3] = 1.0
    with torch.no_grad():  # the last mapping layer's output: dimension 3 varies 10x more than the others
        G.style[-1].weight[3] *= 10
        G.style[-1].bias.zero_()
    top = ganspace_directions(G, n_samples=2000, top_k=1)[0][0]
    assert abs(torch.dot(top, planted)).item() > 0.99


def test_layer_groups():
    assert layer_group(64, "coarse") == [0, 1, 2]
    assert layer_group(64, "middle") == [3, 4, 5, 6]
    assert layer_group(64, "fine") == [7, 8, 9]  # the last index: only the 64px ToRGB reads it
    assert layer_group(64, "all") == list(range(10))
    assert layer_group(1024, "fine") == list(range(7, 18))
    assert sorted(layer_group(256, "coarse") + layer_group(256, "middle") + layer_group(256, "fine")) == list(range(14))
    assert layer_group(make_tiny_generator(0, 32), "middle") == [3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="no fine layers"):
        layer_group(32, "fine")
    with pytest.raises(ValueError, match="unknown layer group"):
        layer_group(64, "eyes")
    assert parse_layers(64, "0-2,7") == [0, 1, 2, 7] and parse_layers(64, None) == list(range(10))
    assert parse_layers(64, [5, 1, 1]) == [1, 5]
    for bad in ("10", "3-x", "", "coarse,fine"):
        with pytest.raises(ValueError):
            parse_layers(64, bad)


def test_a_coarse_edit_leaves_the_fine_layer_styles_unchanged(demo_base):
    G = demo_base
    d = ganspace_directions(G, n_samples=2000, top_k=1)[0][0]
    ws = seed_latents(G, [0, 1, 2])
    edited = apply_direction(ws, d * 4, 1.0, layer_group(G, "coarse"))
    before, after = layer_styles(G, ws), layer_styles(G, edited)
    assert list(before) == [
        "conv4.0", "torgb4", "conv8.0", "conv8.1", "torgb8", "conv16.0", "conv16.1", "torgb16",
        "conv32.0", "conv32.1", "torgb32", "conv64.0", "conv64.1", "torgb64",
    ]  # fmt: skip
    # Every layer of 64px (the fine group) keeps its styles A·w + b bit for bit ...
    for name in ("conv64.0", "conv64.1", "torgb64"):
        assert torch.equal(before[name], after[name]), name
    # ... as do the middle layers that read no coarse index; the coarse layers' styles all move.
    for name in ("conv16.0", "conv16.1", "torgb16", "conv32.0", "conv32.1", "torgb32", "torgb8"):
        assert torch.equal(before[name], after[name]), name
    for name in ("conv4.0", "torgb4", "conv8.0", "conv8.1"):
        assert (before[name] - after[name]).abs().amax(1).min() > 1e-3, name
    # And the image changes: the edit did something.
    assert not torch.equal(G.synthesis(ws), G.synthesis(edited))


def test_a_named_direction_carries_its_layers_and_scale(demo_base, tmp_path):
    G = demo_base
    d, var = ganspace_directions(G, n_samples=2000, top_k=4)
    scales = direction_scales(G, d, n_samples=2000)
    path = save_directions(tmp_path / "d.safetensors", DirectionSet(d, scales, var, directions_meta(G, "ganspace")))
    ds = name_direction(path, 2, "smile", "fine")
    smile = ds.named["smile"]
    assert smile.layers == [7, 8, 9] and smile.index == 2 and smile.method == "ganspace"
    torch.testing.assert_close(smile.vector, d[2] * scales[2])
    ws = seed_latents(G, [4])
    out = smile.apply(ws, -2.0)
    assert torch.equal(out[:, :7], ws[:, :7])
    torch.testing.assert_close(out[:, 7:], ws[:, 7:] - 2.0 * scales[2] * d[2])
    # Lookup by name or index, with a layer override; unknown names say what there is.
    assert ds.get("smile") is smile and ds.get("1").index == 1 and ds.get(1, "coarse").layers == [0, 1, 2]
    assert ds.get("smile", "coarse").layers == [0, 1, 2]
    with pytest.raises(DirectionsError, match=r"unknown direction 'frown'; named directions: smile"):
        ds.get("frown")
    with pytest.raises(DirectionsError, match="out of range"):
        ds.get(4)
    for bad in ("", "3d", "has space", "x" * 40):
        with pytest.raises(ValueError, match="bad direction name"):
            name_direction(path, 0, bad)


def test_directions_files_round_trip_and_refuse_another_generator(demo_base, demo_toon, tmp_path):
    G = demo_toon
    d, ev = sefa_directions(G, top_k=5)
    scales = direction_scales(G, d, n_samples=1000)
    meta = directions_meta(G, "sefa", style="demo")
    path = save_directions(tmp_path / "x.safetensors", DirectionSet(d, scales, ev, meta))
    name_direction(path, 0, "hair", "0-3")
    ds = load_directions(path, G)
    assert ds.method == "sefa" and ds.generator_hash == G.meta["content_hash"] and ds.resolution == 64
    assert ds.meta["style"] == "demo" and len(ds) == 5
    assert torch.equal(ds.components, d) and torch.equal(ds.scales, scales) and torch.equal(ds.values, ev)
    assert ds.named["hair"].layers == [0, 1, 2, 3] and ds.named["hair"].method == "sefa"
    # Made for the toon model: the base model (another latent space) is refused, by name of both.
    with pytest.raises(DirectionsMismatchError, match=r"made for generator 92149a315044, not 72b75da1d5c5"):
        load_directions(path, demo_base)
    with pytest.raises(DirectionsMismatchError):
        ds.check_generator(make_tiny_generator(0, 64))
    # A dict of named directions and a plain tensor save too.
    only = {"hair": ds.named["hair"]}
    p2 = save_directions(tmp_path / "named.safetensors", only, meta)
    back = load_directions(p2)
    assert len(back) == 0 and torch.equal(back.named["hair"].vector, ds.named["hair"].vector)
    p3 = save_directions(tmp_path / "raw.safetensors", d * 3, meta)
    torch.testing.assert_close(load_directions(p3).components, d)
    # Refusals: no metadata, not a directions file, a name that reads as an index, a vector of the wrong size.
    with pytest.raises(ValueError, match="lacks generator_hash"):
        save_directions(tmp_path / "y.safetensors", d, {"method": "sefa"})
    with pytest.raises(DirectionsError, match="not a readable directions file"):
        (tmp_path / "junk.safetensors").write_bytes(b"nope" * 10)
        load_directions(tmp_path / "junk.safetensors")
    with pytest.raises(DirectionsError, match="without directions metadata"):
        load_directions(DEMO / "base.safetensors")
    with pytest.raises(ValueError, match="bad direction name"):
        save_directions(tmp_path / "z.safetensors", {"7": NamedDirection("7", d[0], [0], "sefa")}, meta)
    with pytest.raises(ValueError, match="expected"):
        save_directions(tmp_path / "z.safetensors", {"a": NamedDirection("a", d[0, :5], [0], "sefa")}, meta)


def test_a_styles_directions_live_beside_its_models(tmp_path):
    import json
    import shutil

    for name in ("manifest.json", "toon.safetensors"):
        shutil.copy(DEMO / name, tmp_path / name)
    assert style_directions_path("demo", tmp_path) == tmp_path / "demo.directions.safetensors"
    other = tmp_path / "sub" / "mine.safetensors"
    other.parent.mkdir()
    other.write_bytes(b"")
    assert register_directions(tmp_path, "demo", other) == other
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["styles"]["demo"]["directions"] == "sub/mine.safetensors"
    assert style_directions_path("demo", tmp_path) == other
    with pytest.raises(ValueError, match="no style 'nope'"):
        register_directions(tmp_path, "nope", other)
    with pytest.raises(ValueError, match="unknown style"):
        style_directions_path("nope", tmp_path)


def test_mix_styles_takes_exactly_the_requested_rows():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 10, 8, generator=g), torch.randn(3, 10, 8, generator=g)
    out = mix_styles(a, b, [7, 8, 9])
    assert out is not a and torch.equal(out[:, 7:], b[:, 7:]) and torch.equal(out[:, :7], a[:, :7])
    single = mix_styles(a[0], b[0], layer_group(64, "coarse"))
    assert torch.equal(single[:3], b[0, :3]) and torch.equal(single[3:], a[0, 3:])
    assert torch.equal(mix_styles(a, b, []), a)
    with pytest.raises(ValueError, match="0…9"):
        mix_styles(a, b, [10])
    with pytest.raises(ValueError, match="one shape"):
        mix_styles(a, b[:, :9], [0])


def test_interpolation_ends_are_the_inputs():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    path = interpolate(a, b, 7)
    assert path.shape == (7, 10, 8)
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)
    torch.testing.assert_close(path[3], (a + b) / 2)
    steps = path[1:] - path[:-1]  # linear: equal steps
    torch.testing.assert_close(steps, steps[:1].expand_as(steps))
    assert torch.equal(interpolate(a[None], b[None], 2)[1], b)
    with pytest.raises(ValueError, match="steps"):
        interpolate(a, b, 1)
    with pytest.raises(ValueError, match="one latent per end"):
        interpolate(torch.stack([a, a]), torch.stack([b, b]), 3)


def test_sweep_has_one_frame_per_swap_level_and_decodes(demo_base, demo_toon, tmp_path):
    ws = seed_latents(demo_base, [3, 4])
    frames = blend_sweep_frames(demo_base, demo_toon, ws)
    assert len(frames) == 5  # 4, 8, 16, 32, 64 px
    assert frames[0].size == (2 * 64 + 3 * 2, 64 + 2 * 2 + 14)  # two faces side by side, a label band below
    # Swap at full resolution is the toon model throughout; swap at 16px is the style's demo blend.
    from gan.blending import BlendSpec, blend
    from gan.editing import render
    from gan.images import make_grid

    plain = blend_sweep_frames(demo_base, demo_toon, ws[:1], resolutions=[16, 64], label=False)
    assert len(plain) == 2
    expect = make_grid(render(blend(demo_base, demo_toon, BlendSpec(mode="swap", resolution=16)), ws[:1]), 1, 0)
    assert plain[0].tobytes() == expect.tobytes()
    toon_only = make_grid(render(demo_toon, ws[:1]), 1, 0)
    assert plain[1].tobytes() == toon_only.tobytes()

    for suffix in (".gif", ".webp"):
        path = save_animation(frames, tmp_path / f"sweep{suffix}", duration_ms=200)
        with Image.open(path) as im:
            assert im.n_frames == 5 and im.size == frames[0].size
            im.seek(4)
            im.convert("RGB").load()
    data = animation_bytes(frames, "gif")
    assert data[:6] == b"GIF89a"
    with Image.open(io.BytesIO(data)) as im:
        assert im.n_frames == 5 and im.info.get("loop") == 0
    with Image.open(io.BytesIO(animation_bytes(frames, "webp"))) as im:
        assert im.format == "WEBP" and im.n_frames == 5
    with pytest.raises(ValueError, match=r"\.gif or \.webp"):
        save_animation(frames, tmp_path / "sweep.mp4")
    with pytest.raises(ValueError, match="no frames"):
        animation_bytes([])
