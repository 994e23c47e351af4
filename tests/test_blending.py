"""Blending: which model every parameter comes from, smooth/explicit weights, checks, lineage, metadata."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import warnings

import pytest
import torch

from gan import load_generator, save_generator
from gan.blending import BlendError, BlendSpec, LineageWarning, blend
from gan.checkpoints.common import content_hash
from gan.networks import Generator
from tests.conftest import make_tiny_generator, tiny_config

RES = 64
NEVER_BLENDED = ("style.", "conv1.", "noises.")


@pytest.fixture
def pair() -> tuple[Generator, Generator]:
    base, toon = make_tiny_generator(1, RES), make_tiny_generator(2, RES)
    toon.meta = {"ancestors": [content_hash(base.state_dict())]}  # toon was fine-tuned from base
    return base, toon


def layer_of(name: str) -> tuple[int, int] | None:
    """(resolution, level) of a parameter, written from the rosinality names independently of gan.blending."""
    parts = name.split(".")
    if name.startswith(NEVER_BLENDED) or name.endswith("kernel"):
        return None
    if parts[0] == "input":
        return 4, 0
    if parts[0] == "to_rgb1":
        return 4, 1
    if parts[0] == "convs":
        i = int(parts[1])
        return 8 * 2 ** (i // 2), i % 2
    assert parts[0] == "to_rgbs", name
    return 8 * 2 ** int(parts[1]), 1


def position(res: int, level: int) -> int:
    return 2 * (int(math.log2(res)) - 2) + level


def by_source(base: Generator, toon: Generator, structure_from: str) -> tuple[dict, dict]:
    """(structure model's state dict, the other one's)."""
    s, o = (toon, base) if structure_from == "toon" else (base, toon)
    return s.state_dict(), o.state_dict()


def quiet_blend(base: Generator, toon: Generator, spec: BlendSpec) -> Generator:
    with warnings.catch_warnings():
        warnings.simplefilter("error", LineageWarning)  # the fixture's lineage is sound: a warning is a bug
        return blend(base, toon, spec)


@pytest.mark.parametrize("structure_from", ["toon", "base"])
@pytest.mark.parametrize("swap_res", [4, 8, 16, 32, 64])
def test_swap_takes_each_parameter_from_the_right_model(pair, swap_res, structure_from):
    base, toon = pair
    out = quiet_blend(base, toon, BlendSpec("swap", swap_res, structure_from))
    low, high = by_source(base, toon, structure_from)
    sd = out.state_dict()
    assert sd.keys() == low.keys()
    for name, t in sd.items():
        layer = layer_of(name)
        src, other = (low, high) if layer is None or layer[0] <= swap_res else (high, low)
        assert torch.equal(t, src[name]), name
        if not name.endswith("kernel"):  # fixed FIR kernels are the same in both models
            assert not torch.equal(t, other[name]), name
    assert torch.equal(out.w_avg, (toon if structure_from == "toon" else base).w_avg)


def test_swap_level_1_keeps_the_next_upsampling_conv():
    shares = BlendSpec("swap", 16, level=1).layer_weights(RES)  # Justin's rule: x > 1 from mid = (16, 1)
    assert shares == [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]  # 4, 8, 16 and 32's Conv0_up from the toon


@pytest.mark.parametrize("structure_from", ["toon", "base"])
def test_smooth_mixes_every_layer_monotonically(pair, structure_from):
    base, toon = pair
    spec = BlendSpec("smooth", 16, structure_from, width=1.5)
    shares = spec.layer_weights(RES)
    assert len(shares) == 10 and all(0 < s < 1 for s in shares)
    assert shares[position(16, 0)] == 0.5
    steps = [b - a for a, b in itertools.pairwise(shares)]
    assert all(d < 0 for d in steps) if structure_from == "toon" else all(d > 0 for d in steps)
    out = quiet_blend(base, toon, spec)
    sb, st, structure = base.state_dict(), toon.state_dict(), by_source(base, toon, structure_from)[0]
    for name, t in out.state_dict().items():
        layer = layer_of(name)
        if layer is None:
            assert torch.equal(t, structure[name]), name
        else:
            s = shares[position(*layer)]
            torch.testing.assert_close(t, s * st[name] + (1 - s) * sb[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("structure_from", ["toon", "base"])
def test_explicit_weights(pair, structure_from):
    base, toon = pair
    weights = [1.0, 0.0, 0.25, 0.5, 0.75, 1.0, 0.0, 0.5, 1.0, 0.0]
    out = quiet_blend(base, toon, BlendSpec("weights", structure_from=structure_from, weights=weights))
    sb, st, structure = base.state_dict(), toon.state_dict(), by_source(base, toon, structure_from)[0]
    for name, t in out.state_dict().items():
        layer = layer_of(name)
        if layer is None:
            assert torch.equal(t, structure[name]), name
            continue
        s = weights[position(*layer)]
        if s in (0.0, 1.0):
            assert torch.equal(t, st[name] if s else sb[name]), name
        else:
            torch.testing.assert_close(t, s * st[name] + (1 - s) * sb[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="swap"),
        dict(mode="swap", resolution=48),
        dict(mode="swap", resolution=2048),
        dict(mode="swap", resolution=32, width=1.0),
        dict(mode="swap", resolution=32, level=2),
        dict(mode="smooth", resolution=32),
        dict(mode="smooth", resolution=32, width=0.0),
        dict(mode="smooth", resolution=32, width=float("inf")),
        dict(mode="weights"),
        dict(mode="weights", weights=[1.0, 0.0, 1.0]),
        dict(mode="weights", weights=[1.0, 0.0, 1.5, 0.0]),
        dict(mode="weights", weights=[1.0, 0.0, float("nan"), 0.0]),
        dict(mode="weights", weights=[1.0, 0.0, 1.0, 0.0], resolution=32),
        dict(mode="swap", resolution=32, weights=[1.0, 0.0, 1.0, 0.0]),
        dict(mode="mix", resolution=32),
        dict(mode="swap", resolution=32, structure_from="photo"),
    ],
)
def test_bad_specs_are_refused(kwargs):
    with pytest.raises(ValueError):
        BlendSpec(**kwargs)


def test_spec_must_fit_the_models(pair):
    base, toon = pair
    with pytest.raises(ValueError, match="only 64px"):
        blend(base, toon, BlendSpec("swap", 128))
    with pytest.raises(ValueError, match="10 blend positions"):
        blend(base, toon, BlendSpec("weights", weights=[0.5] * 8))


def test_architecture_mismatch_is_refused(pair):
    base, toon = pair
    with pytest.raises(BlendError, match="different architectures"):
        blend(base, make_tiny_generator(3, 32), BlendSpec("swap", 16))
    wide = Generator(tiny_config(RES, lr_mlp=0.02))
    with pytest.raises(BlendError):
        blend(base, wide, BlendSpec("swap", 16))
    toon.to_rgb1.bias = torch.nn.Parameter(torch.zeros(1, 3, 2, 2))  # same config, a tampered shape
    with pytest.raises(BlendError, match=r"to_rgb1\.bias"):
        blend(base, toon, BlendSpec("swap", 16))
    assert issubclass(BlendError, ValueError)


def test_lineage_warning():
    base, toon = make_tiny_generator(1, RES), make_tiny_generator(2, RES)
    spec = BlendSpec("swap", 16)
    with pytest.warns(LineageWarning, match="no recorded ancestor") as record:
        blend(base, toon, spec)
    assert record[0].filename == __file__  # points at the caller, not into gan.blending
    hb = content_hash(base.state_dict())
    for base_meta, toon_meta in [
        ({}, {"ancestors": [hb]}),  # toon fine-tuned from base (hash computed: base.meta absent)
        ({"content_hash": "b" * 64}, {"ancestors": ["b" * 64]}),  # recorded hash is used as is
        ({"ancestors": ["f" * 64]}, {"ancestors": ["f" * 64, "e" * 64]}),  # siblings from one base
        ({"ancestors": [content_hash(toon.state_dict())]}, {}),  # the other way round
    ]:
        base.meta, toon.meta = base_meta, toon_meta
        quiet_blend(base, toon, spec)


def test_result_is_new_and_records_its_recipe(pair):
    base, toon = pair
    base.meta = {"content_hash": content_hash(base.state_dict()), "ancestors": ["a" * 64]}
    before = {k: v.clone() for k, v in toon.state_dict().items()}
    spec = BlendSpec("smooth", 32, width=0.7)
    out = quiet_blend(base, toon, spec)
    assert out is not base and out is not toon and not out.training
    assert all(torch.equal(v, before[k]) for k, v in toon.state_dict().items())
    hb, ht = base.meta["content_hash"], content_hash(toon.state_dict())
    assert out.meta == {
        "blend": spec.to_json(),
        "parents": {"base": hb, "toon": ht},
        "ancestors": sorted({hb, ht, "a" * 64}),
    }
    assert base.meta["ancestors"] == ["a" * 64] and toon.meta == {"ancestors": [hb]}


@pytest.mark.parametrize(
    "spec",
    [
        BlendSpec("swap", 32),
        BlendSpec("swap", 4, "base", level=1),
        BlendSpec("smooth", 64, width=2.5),
        BlendSpec("weights", structure_from="base", weights=(1, 0.5, 0.25, 0.0)),
    ],
)
def test_json_round_trip(spec):
    d = json.loads(json.dumps(spec.to_json()))
    assert BlendSpec.from_json(d) == spec
    assert BlendSpec.from_json(json.dumps(d)) == spec
    assert spec.describe() and spec.structure_from in spec.describe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.mode = "swap"  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown"):
        BlendSpec.from_json({**d, "colour": "blue"})


def test_metadata_survives_save_and_load(pair, tmp_path):
    base, toon = pair
    spec = BlendSpec("smooth", 16, width=1.5)
    out = quiet_blend(base, toon, spec)
    path = save_generator(out, tmp_path / "blend.safetensors")
    loaded = load_generator(path)
    assert loaded.meta["blend"] == spec.to_json()
    assert loaded.meta["parents"] == out.meta["parents"]
    assert loaded.meta["ancestors"] == out.meta["ancestors"]
    assert all(torch.equal(v, out.state_dict()[k]) for k, v in loaded.state_dict().items())
    # The recipe alone reproduces the file.
    again = quiet_blend(base, toon, BlendSpec.from_json(loaded.meta["blend"]))
    assert content_hash(again.state_dict()) == loaded.meta["content_hash"]


@pytest.mark.parametrize("spec", [BlendSpec("swap", 16), BlendSpec("smooth", 32, "base", width=1.0)])
def test_blend_renders(pair, spec):
    out = quiet_blend(*pair, spec)
    img = out(torch.randn(2, out.z_dim, generator=torch.Generator().manual_seed(0)))
    assert img.shape == (2, 3, RES, RES) and torch.isfinite(img).all()


@pytest.mark.parametrize("structure_from", ["toon", "base"])
def test_swap_at_top_resolution_is_the_structure_model(pair, structure_from):
    # Every position is <= mid + 1, and the never-blended parts come from the same model: an exact copy.
    base, toon = pair
    out = quiet_blend(base, toon, BlendSpec("swap", RES, structure_from))
    same = toon if structure_from == "toon" else base
    z = torch.randn(3, out.z_dim, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out(z), same(z))


def test_never_blended_parts_follow_the_structure_model(pair):
    # All-toon weights with structure from the base: the image is the toon model's, except that the mapping
    # network, 4x4 conv1, noise maps and w_avg are the base's (Justin's quirk), so graft those and compare.
    base, toon = pair
    out = quiet_blend(base, toon, BlendSpec("weights", structure_from="base", weights=[1.0] * 10))
    grafted = make_tiny_generator(2, RES)
    sd, sb = grafted.state_dict(), base.state_dict()
    grafted.load_state_dict({k: sb[k] if k.startswith(NEVER_BLENDED) else v for k, v in sd.items()})
    grafted.w_avg.copy_(base.w_avg)
    z = torch.randn(3, out.z_dim, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out(z, truncation_psi=0.7), grafted(z, truncation_psi=0.7))
    assert not torch.allclose(out(z), toon(z))  # the grafted parts matter


def test_result_takes_the_base_models_dtype(pair):
    base, toon = pair
    out = quiet_blend(base, toon.double(), BlendSpec("smooth", 16, width=1.0))
    assert {t.dtype for t in out.state_dict().values()} == {torch.float32}
    assert torch.equal(out.conv1.conv.weight, toon.conv1.conv.weight.float())  # structure model, cast
