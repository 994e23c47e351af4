"""Training core: losses, EMA, lazy R1, FreezeD/FreezeG, DiffAugment, snapshot/resume, fine-tuning, lineage."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from gan.checkpoints import content_hash, load_discriminator, read_checkpoint, save_generator
from gan.synthetic import make_dataset
from gan.training import TrainConfig, Trainer, diff_augment, finetune, images_to_tensor
from tests.conftest import make_tiny_discriminator, make_tiny_generator

RES = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two multi-threaded torch
    processes slow each other down by an order of magnitude (measured: 9 s vs 259 s for this file)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return make_dataset(24, "photo", RES, seed=3)


def make_trainer(data, seed: int = 0, res: int = RES, **cfg) -> Trainer:
    G, D = make_tiny_generator(seed, res).train(), make_tiny_discriminator(seed + 1, res).train()
    G.requires_grad_(True)
    return Trainer(G, D, data, TrainConfig(**{"batch": 4, "seed": seed, **cfg}))


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_steps_give_finite_losses_and_ema_follows_g(photos):
    t = make_trainer(photos, r1_every=2, pl_weight=2.0, pl_every=2, diffaugment="color,translation,cutout")
    g0 = params(t.G)
    for _ in range(4):
        stats = t.step()
        assert all(math.isfinite(v) for v in stats.values()), stats
    assert t.step_count == 4 and t.nimg == 16
    assert any(not torch.equal(g0[k], v) for k, v in t.G.named_parameters())
    ema, g = params(t.G_ema), params(t.G)
    assert any(not torch.equal(ema[k], g[k]) for k in g)  # the EMA lags behind G
    # ... but it has moved from the start toward where G went
    moved = sum((ema[k] - g0[k]).norm() for k in g)
    assert moved > 0


def test_ema_update_is_exact_lerp_with_the_halflife_beta(photos):
    t = make_trainer(photos, ema_kimg=0.01, ema_rampup=None)
    t.step()  # leave the first step's bookkeeping behind
    beta = t.ema_beta()
    assert beta == pytest.approx(0.5 ** (4 / 10))
    before = params(t.G_ema)
    t.step()
    after_g, after_ema = params(t.G), params(t.G_ema)
    for k in after_g:
        torch.testing.assert_close(after_ema[k], after_g[k].lerp(before[k], beta), rtol=0, atol=0)


def test_ema_rampup_starts_as_a_copy(photos):
    t = make_trainer(photos, ema_kimg=10, ema_rampup=0.05)
    assert t.ema_beta() == 0.0  # nothing seen yet: the ramped half-life is zero
    t.step()
    for k, v in t.G.named_parameters():
        assert torch.equal(dict(t.G_ema.named_parameters())[k], v)
    assert 0 < t.ema_beta() < 0.5 ** (4 / 10_000)


def test_frozen_layers_are_bit_identical_and_the_rest_trains(photos):
    t = make_trainer(photos, freeze_d=2, freeze_g=1, r1_every=2, pl_weight=2.0, pl_every=2)
    g0, d0, e0 = params(t.G), params(t.D), params(t.G_ema)
    for _ in range(3):
        t.step()
    g1, d1, e1 = params(t.G), params(t.D), params(t.G_ema)
    top = ("convs.2.", "convs.3.", "to_rgbs.1.")  # the 16 px block: the only one FreezeG=1 trains at 16 px
    for k in g0:
        assert torch.equal(g0[k], g1[k]) != k.startswith(top), k
        if not k.startswith(top):
            assert torch.equal(e0[k], e1[k]), k  # the EMA of a constant is that constant, bit for bit
    frozen_d = ("convs.0.", "convs.1.", "convs.2.")  # fromRGB + the first two resolution blocks
    for k in d0:
        assert torch.equal(d0[k], d1[k]) == k.startswith(frozen_d), k
    with pytest.raises(ValueError, match="freeze_d"):
        make_trainer(photos, freeze_d=9)


def test_r1_runs_only_every_r1_every_steps(photos):
    t = make_trainer(photos, r1_every=3)
    assert ["r1" in t.step() for _ in range(7)] == [True, False, False, True, False, False, True]
    t = make_trainer(photos, r1_gamma=0)
    assert not any("r1" in t.step() for _ in range(2))


def test_diffaugment_shapes_gradients_identity():
    x = torch.randn(6, 3, 16, 16, requires_grad=True)
    assert diff_augment(x, "") is x
    for policy in ("color", "translation", "cutout", "color,translation,cutout"):
        y = diff_augment(x, policy, torch.Generator().manual_seed(1))
        assert y.shape == x.shape and not torch.equal(y, x)
        (grad,) = torch.autograd.grad(y.square().sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        y2 = diff_augment(x, policy, torch.Generator().manual_seed(1))
        assert torch.equal(y, y2)  # seeded: reproducible
    with pytest.raises(ValueError, match="policy"):
        diff_augment(x, "rotate")


def test_translation_is_an_integer_shift_with_zero_fill_and_cutout_a_box():
    x = torch.rand(8, 3, 16, 16) + 1  # no zeros of its own
    y = diff_augment(x, "translation", torch.Generator().manual_seed(0))
    for xi, yi in zip(x, y, strict=True):
        hits = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                shifted = torch.zeros_like(xi)
                src = xi[:, max(0, dy) : 16 + min(0, dy), max(0, dx) : 16 + min(0, dx)]
                shifted[:, max(0, -dy) : 16 + min(0, -dy), max(0, -dx) : 16 + min(0, -dx)] = src
                hits.append(torch.equal(shifted, yi))
        assert sum(hits) == 1
    z = diff_augment(x, "cutout", torch.Generator().manual_seed(0))
    holes = (z == 0).all(1)  # [N, H, W]
    for h in holes:
        rows, cols = h.any(1).nonzero(), h.any(0).nonzero()
        assert 0 < h.sum() <= 64 and h.sum() == len(rows) * len(cols)  # one axis-aligned box, at most 8 x 8


def test_snapshot_resume_matches_an_uninterrupted_run(photos, tmp_path):
    cfg = {"r1_every": 2, "xflip": True, "diffaugment": "color,translation", "style_mixing": 0.5, "freeze_d": 1}
    straight = make_trainer(photos, seed=5, **cfg)
    assert straight.train(steps=7)
    first = make_trainer(photos, seed=5, **cfg)
    first.train(steps=4)
    path = first.save_snapshot(tmp_path / "run" / "snap.pt")
    assert not list(path.parent.glob("*.tmp"))
    del first
    resumed = Trainer.resume(path, photos)
    assert resumed.step_count == 4
    seen = []
    assert resumed.train(steps=7, progress=lambda s, total, st: seen.append((s, total)))
    assert seen == [(5, 7), (6, 7), (7, 7)]
    for a, b in ((straight.G, resumed.G), (straight.G_ema, resumed.G_ema), (straight.D, resumed.D)):
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(v, w), k


class _Evil:
    def __reduce__(self):
        return (print, ("code ran while loading a snapshot",))


def test_snapshot_loading_runs_no_code(photos, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"version": 1, "payload": _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        Trainer.resume(path, photos)


def test_train_can_be_cancelled_between_steps(photos):
    t = make_trainer(photos)
    assert t.train(kimg=0.04, should_cancel=lambda: t.step_count >= 3) is False
    assert t.step_count == 3
    assert t.train(kimg=0.04)  # resumes to the target: 40 images at batch 4
    assert t.step_count == 10


def colour_stats(images: torch.Tensor) -> np.ndarray:
    """Mean brightness and fraction of near-black pixels: the toon domain's ink outlines make it darker."""
    a = images.clamp(-1, 1) * 0.5 + 0.5
    return np.array([a.mean().item(), (a.amax(1) < 0.2).float().mean().item()])


def test_finetune_moves_samples_toward_the_toon_domain_and_records_lineage(tmp_path):
    G_base, D_base = make_tiny_generator(11, RES), make_tiny_discriminator(12, RES)
    base_hash = content_hash(G_base.state_dict())
    z = torch.randn(64, G_base.z_dim, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(batch=8, ema_kimg=0.05, ema_rampup=None, freeze_d=1, g_lr=0.01, d_lr=0.01, seed=3)
    tuned, data = {}, {}
    for domain in ("toon", "photo"):  # the same fine-tune on each domain: only the data differs
        data[domain] = make_dataset(32, domain, RES, seed=7)
        G, D = finetune(G_base, D_base, data[domain], cfg, steps=20, dataset={"name": f"{domain}-test"})
        with torch.no_grad():
            tuned[domain] = colour_stats(G(z))
        if domain == "toon":
            G_toon, D_toon = G, D
    toon_target = colour_stats(images_to_tensor(data["toon"]))
    assert toon_target[0] < colour_stats(images_to_tensor(data["photo"]))[0]  # premise: toons are darker
    assert tuned["toon"][0] < tuned["photo"][0] - 0.03, tuned
    assert tuned["toon"][1] > 1.5 * tuned["photo"][1], tuned
    assert np.abs(tuned["toon"] - toon_target).sum() < np.abs(tuned["photo"] - toon_target).sum()
    assert content_hash(G_base.state_dict()) == base_hash  # the base is left alone

    path = save_generator(G_toon, tmp_path / "toon.safetensors", D=D_toon)
    meta = read_checkpoint(path).meta
    assert meta["ancestors"] == [base_hash]
    assert meta["training"]["config"]["freeze_d"] == 1 and meta["training"]["steps"] == 20
    assert meta["training"]["dataset"] == {"name": "toon-test"}
    assert load_discriminator(path).resolution == RES


def test_trainer_export_and_scratch_lineage(photos, tmp_path):
    t = make_trainer(photos, freeze_g=2)
    t.meta = {"ancestors": ["abc"], "dataset": {"n": 24}}
    t.step()
    meta = read_checkpoint(t.export(tmp_path / "g.safetensors")).meta
    assert meta["ancestors"] == ["abc"] and meta["training"]["kimg"] == 0.004
    assert meta["training"]["config"]["freeze_g"] == 2 and meta["training"]["dataset"] == {"n": 24}


# ----------------------------------------------------------------------------------------------------------
# ADA, mixed precision, augmentation state in snapshots


def test_augment_probability_applies_each_op_per_sample():
    x = torch.rand(64, 3, 16, 16) + 1
    assert diff_augment(x, "color,cutout", torch.Generator().manual_seed(0), p=0.0) is x
    same = diff_augment(x, "cutout", torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(same, diff_augment(x, "cutout", torch.Generator().manual_seed(0)))  # p=1: unchanged runs
    y = diff_augment(x, "cutout", torch.Generator().manual_seed(0), p=0.5)
    touched = (y != x).flatten(1).any(1).float().mean().item()
    assert 0.25 < touched < 0.75  # about half the samples got a hole


def test_ada_moves_p_by_the_sign_rule_and_clamps_at_zero(photos):
    t = make_trainer(photos, diffaugment="color", ada_target=0.6, ada_interval=2, ada_kimg=0.1)
    assert t.aug_p == 0.0  # ADA starts without augmentation
    step = 4 * 2 / (0.1 * 1000)  # batch · interval / (ada_kimg · 1000)

    def feed(logit: float, steps: int) -> None:
        for _ in range(steps):
            t._ada_update(torch.full((4, 1), logit))
            t.step_count += 1

    feed(+1.0, 4)  # D sure of every real: overfitting, so augment more
    assert t.aug_p == pytest.approx(2 * step)
    feed(-1.0, 2)
    assert t.aug_p == pytest.approx(step)
    feed(-1.0, 8)
    assert t.aug_p == 0.0
    with pytest.raises(ValueError, match="ada_target"):
        TrainConfig(ada_target=0.6)  # nothing to adapt without policies


def test_snapshot_resume_with_ada_matches_an_uninterrupted_run(photos, tmp_path):
    cfg = {"diffaugment": "color,translation,cutout", "ada_target": 0.0, "ada_interval": 1, "ada_kimg": 0.05}
    straight = make_trainer(photos, seed=2, **cfg)
    straight.train(steps=6)
    assert 0 < straight.aug_p < 1  # it moved: the resumed run must restore it
    first = make_trainer(photos, seed=2, **cfg)
    first.train(steps=3)
    resumed = Trainer.resume(first.save_snapshot(tmp_path / "snap.pt"), photos)
    assert resumed.aug_p == first.aug_p and resumed._ada_signs == first._ada_signs
    resumed.train(steps=6)
    assert resumed.aug_p == straight.aug_p
    for (k, v), w in zip(straight.G_ema.state_dict().items(), resumed.G_ema.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_version_1_snapshots_still_load(photos, tmp_path):
    t = make_trainer(photos, diffaugment="color")
    t.step()
    state = t.state_dict()
    state["version"] = 1
    del state["augment"]
    torch.save(state, tmp_path / "v1.pt")
    resumed = Trainer.resume(tmp_path / "v1.pt", photos)
    assert resumed.step_count == 1 and resumed.aug_p == 1.0


def test_mixed_precision_path_trains_and_keeps_frozen_layers(photos, monkeypatch):
    monkeypatch.setattr(Trainer, "AMP_DEVICE_TYPES", ("cuda", "cpu"))  # bfloat16 autocast exists on CPU too
    t = make_trainer(photos, mixed_precision=True, freeze_d=1, r1_every=2, diffaugment="color")
    assert t.amp
    g0, d0 = params(t.G), params(t.D)
    for _ in range(3):
        stats = t.step()
        assert all(math.isfinite(v) for v in stats.values()), stats
    assert all(p.dtype == torch.float32 for p in t.G.parameters())  # weights stay float32
    assert any(not torch.equal(g0[k], v) for k, v in t.G.named_parameters())
    for k, v in t.D.named_parameters():
        assert torch.equal(d0[k], v) == k.startswith(("convs.0.", "convs.1.")), k
    monkeypatch.setattr(Trainer, "AMP_DEVICE_TYPES", ("cuda",))
    assert not make_trainer(photos, mixed_precision=True).amp  # on CPU it is ignored


def test_statistics_only_when_asked_and_the_same_training(photos):
    """step(stats=False) reads nothing from the device and trains exactly as step(stats=True)."""
    cfg = {"diffaugment": "color,translation", "ada_target": 0.6, "ada_interval": 2, "r1_every": 2, "xflip": True}
    quiet, loud = make_trainer(photos, seed=4, **cfg), make_trainer(photos, seed=4, **cfg)
    for _ in range(4):
        assert set(quiet.step(stats=False)) == {"aug_p", "ema_beta"}
        assert {"d_loss", "g_loss", "real_score", "fake_score"} <= set(loud.step(stats=True))
    assert quiet.aug_p == loud.aug_p and quiet._ada_signs == loud._ada_signs
    for (k, v), w in zip(quiet.G_ema.state_dict().items(), loud.G_ema.state_dict().values(), strict=True):
        assert torch.equal(v, w), k

    seen: list[tuple[int, bool]] = []
    t = make_trainer(photos, seed=4, **cfg)
    t.train(steps=7, stats_every=3, progress=lambda step, total, stats: seen.append((step, "d_loss" in stats)))
    assert [s for s, has in seen if has] == [3, 6, 7]  # every 3rd step and the last
    assert [s for s, _ in seen] == list(range(1, 8))
