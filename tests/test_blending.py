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
from gan.blending import BlendError, BlendSpec, LineageWarning, base_and_toon_shares, blend, blend_many
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


# ----------------------------------------------------------------------------------------------------------
# Blends of several generators


@pytest.fixture
def trio() -> list[Generator]:
    """A base and two models fine-tuned from it (say a snapshot and the final toon model)."""
    base = make_tiny_generator(1, RES)
    hb = content_hash(base.state_dict())
    models = [base, make_tiny_generator(2, RES), make_tiny_generator(3, RES)]
    for G in models[1:]:
        G.meta = {"ancestors": [hb]}
    return models


def quiet_many(models, shares, **kw) -> Generator:
    with warnings.catch_warnings():
        warnings.simplefilter("error", LineageWarning)
        return blend_many(models, shares, **kw)


def one_hot(owners: list[int], models: int) -> list[list[float]]:
    return [[1.0 if owner == i else 0.0 for owner in owners] for i in range(models)]


def test_three_way_one_hot_shares_take_each_layer_from_its_model(trio):
    owners = [2, 0, 1, 1, 0, 2, 2, 1, 0, 0]  # the model of each blend position, 4x4 const first
    out = quiet_many(trio, one_hot(owners, 3))
    states = [G.state_dict() for G in trio]
    for name, t in out.state_dict().items():
        layer = layer_of(name)
        owner = 2 if layer is None else owners[position(*layer)]  # never-blended parts: the 4x4 owner's
        assert torch.equal(t, states[owner][name]), name
        if not name.endswith("kernel"):
            assert not any(torch.equal(t, states[i][name]) for i in range(3) if i != owner), name
    assert torch.equal(out.w_avg, trio[2].w_avg)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_all_shares_on_one_model_is_that_model(trio, k):
    out = quiet_many(trio, one_hot([k] * 10, 3))
    z = torch.randn(3, out.z_dim, generator=torch.Generator().manual_seed(4))
    assert torch.equal(out(z, truncation_psi=0.7), trio[k](z, truncation_psi=0.7))
    assert out.meta["blend_many"]["structure_from"] == k


@pytest.mark.parametrize("structure_from", ["toon", "base"])
def test_two_model_blend_many_is_the_weights_blend(pair, structure_from):
    base, toon = pair
    w = [1.0, 0.9, 0.75, 0.5, 0.5, 0.3, 0.2, 0.0, 0.0, 0.0]
    two = quiet_blend(base, toon, BlendSpec("weights", structure_from=structure_from, weights=w))
    many = quiet_many([base, toon], [[1 - x for x in w], w], structure_from=1 if structure_from == "toon" else 0)
    assert two.state_dict().keys() == many.state_dict().keys()
    assert all(torch.equal(v, many.state_dict()[k]) for k, v in two.state_dict().items())
    assert torch.equal(two.w_avg, many.w_avg)


def test_even_shares_average_the_three_models(trio):
    out = quiet_many(trio, [[1 / 3] * 10] * 3, structure_from=1)
    states = [G.state_dict() for G in trio]
    for name, t in out.state_dict().items():
        if layer_of(name) is None:
            assert torch.equal(t, states[1][name]), name  # structure_from
        else:
            mean = sum(s[name] for s in states) / 3
            torch.testing.assert_close(t, mean, rtol=1e-5, atol=1e-6)


def test_bad_shares_and_models_are_refused(trio):
    with pytest.raises(ValueError, match="sum to 1"):
        blend_many(trio, [[0.5] * 10, [0.5] * 10, [0.5] * 10])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        blend_many(trio, [[1.5] * 10, [-0.5] * 10, [0.0] * 10])
    with pytest.raises(ValueError, match="10 blend positions"):
        blend_many(trio, one_hot([0] * 8, 3))
    with pytest.raises(ValueError, match="one row per generator"):
        blend_many(trio, one_hot([0] * 10, 2))
    with pytest.raises(ValueError, match="at least two"):
        blend_many(trio[:1], [[1.0] * 10])
    with pytest.raises(ValueError, match="structure_from"):
        blend_many(trio, one_hot([0] * 10, 3), structure_from=3)
    with pytest.raises(BlendError, match="different architectures"):
        blend_many([*trio, make_tiny_generator(4, 32)], one_hot([0] * 10, 4))


def test_blend_many_lineage_warning_names_the_unrelated_pair(trio):
    stranger = make_tiny_generator(5, RES)
    with pytest.warns(LineageWarning) as record:
        blend_many([*trio, stranger], one_hot([0] * 10, 4))
    messages = [str(w.message) for w in record]
    assert [m.split(" (")[0] for m in messages] == ["models 0", "models 1", "models 2"]  # each against the stranger
    assert all(" and 3 (" in m for m in messages) and record[0].filename == __file__


def test_blend_many_records_its_recipe_and_survives_save_and_load(trio, tmp_path):
    shares = [[0.0] * 4 + [1.0] * 6, [1.0] * 4 + [0.0] * 6, [0.0] * 10]
    shares[2][5], shares[0][5] = 0.5, 0.5
    out = quiet_many(trio, shares)
    hashes = [content_hash(G.state_dict()) for G in trio]
    assert out.meta == {
        "blend_many": {"shares": shares, "structure_from": 1, "parents": hashes},
        "ancestors": sorted(set(hashes)),
    }
    loaded = load_generator(save_generator(out, tmp_path / "many.safetensors"))
    assert loaded.meta["blend_many"] == out.meta["blend_many"]
    assert all(torch.equal(v, out.state_dict()[k]) for k, v in loaded.state_dict().items())
    z = torch.randn(2, out.z_dim, generator=torch.Generator().manual_seed(0))
    img = loaded(z)
    assert img.shape == (2, 3, RES, RES) and torch.isfinite(img).all()


def test_the_base_takes_what_the_toons_leave():
    assert base_and_toon_shares([[1, 0.5, 0], [0, 0.25, 0]]) == [[0, 0.25, 1], [1, 0.5, 0], [0, 0.25, 0]]
    rows = base_and_toon_shares([[0.1, 0.2], [0.2, 0.1], [0.7, 0.7]])
    assert all(v >= 0 for v in rows[0]) and rows[0] == pytest.approx([0, 0])
    with pytest.raises(ValueError, match="more than 1"):
        base_and_toon_shares([[0.6, 0], [0.6, 0]])
    with pytest.raises(ValueError, match="same length"):
        base_and_toon_shares([[0.5, 0], [0.5]])


def test_cli_blends_several_models_with_shares(trio, tmp_path, capsys):
    from gan.cli import main

    paths = [save_generator(G, tmp_path / f"m{i}.safetensors") for i, G in enumerate(trio)]
    t1, t2 = "1,1,1,1,0,0,0,0,0,0", "0,0,0,0,1,1,0.5,0.5,0,0"
    out = tmp_path / "mix.safetensors"
    args = ["blend", *map(str, paths), "--shares", t1, "--shares", t2, "--out", str(out)]
    assert main(args) == 0
    assert "3 models" in capsys.readouterr().err
    loaded = load_generator(out)
    rows = base_and_toon_shares([[float(x) for x in t.split(",")] for t in (t1, t2)])
    expected = quiet_many([load_generator(p) for p in paths], rows)
    assert loaded.meta["blend_many"]["shares"] == rows and loaded.meta["blend_many"]["structure_from"] == 1
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert main([*args[:-2], "--structure-from", "2", "--out", str(out)]) == 0
    assert load_generator(out).meta["blend_many"]["structure_from"] == 2

    for bad, why in [
        (["blend", *map(str, paths), "--shares", t1, "--out", str(out)], "once per TOON"),
        (["blend", *map(str, paths), "--out", str(out)], "needs --shares"),
        (["blend", *map(str, paths[:2]), "--shares", "1,x", "--out", str(out)], "numbers"),
        (["blend", *map(str, paths[:2]), "--shares", t1, "--swap", "16", "--out", str(out)], "replaces"),
        (["blend", *map(str, paths), "--shares", t1, "--shares", t1, "--out", str(out)], "more than 1"),
        (["blend", *map(str, paths), "--shares", t1, "--shares", t2, "--structure-from", "5", "--out", "x"], "only 3"),
    ]:
        assert main(bad) == 2, bad
        assert why in capsys.readouterr().err, bad


def test_cli_two_model_weights_follow_structure_from(pair, tmp_path):
    from gan.cli import main

    base, toon = pair
    pb, pt = save_generator(base, tmp_path / "b.safetensors"), save_generator(toon, tmp_path / "t.safetensors")
    w = "1,1,1,1,0.5,0,0,0,0,0"
    out = tmp_path / "o.safetensors"
    assert main(["blend", str(pb), str(pt), "--weights", w, "--structure-from", "base", "--out", str(out)]) == 0
    assert load_generator(out).meta["blend"]["structure_from"] == "base"
    assert main(["blend", str(pb), str(pt), "--swap", "16", "--structure-from", "2", "--out", str(out)]) == 2
