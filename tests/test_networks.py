import math

import numpy as np
import pytest
import torch

from gan.networks import (
    Discriminator,
    Generator,
    GeneratorConfig,
    ModulatedConv2d,
    default_channels,
    discriminator_channels_from_state_dict,
    generator_config_from_state_dict,
    make_kernel,
    upfirdn2d,
)
from tests.conftest import make_tiny_generator, tiny_config


def naive_upfirdn2d(x: np.ndarray, k: np.ndarray, up: int, down: int, pad: tuple[int, int]) -> np.ndarray:
    """Direct definition: zero insertion, zero padding (negative = crop), true convolution, decimation."""
    n, c, h, w = x.shape
    z = np.zeros((n, c, h * up, w * up))
    z[:, :, ::up, ::up] = x
    p0, p1 = pad
    z = np.pad(z, ((0, 0), (0, 0), (max(p0, 0), max(p1, 0)), (max(p0, 0), max(p1, 0))))
    z = z[:, :, max(-p0, 0) : z.shape[2] - max(-p1, 0), max(-p0, 0) : z.shape[3] - max(-p1, 0)]
    kh, kw = k.shape
    oh, ow = z.shape[2] - kh + 1, z.shape[3] - kw + 1
    out = np.zeros((n, c, oh, ow))
    for i in range(kh):
        for j in range(kw):
            out += k[kh - 1 - i, kw - 1 - j] * z[:, :, i : i + oh, j : j + ow]
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize(
    "up,down,pad",
    [(1, 1, (1, 1)), (2, 1, (2, 1)), (2, 1, (1, 1)), (1, 2, (2, 2)), (1, 2, (1, 1)), (2, 1, (-1, 0)), (2, 2, (1, 2))],
)
def test_upfirdn2d_matches_its_definition(up, down, pad):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 7))
    k = rng.standard_normal((4, 4))  # asymmetric on purpose: catches a missing flip
    ours = upfirdn2d(torch.from_numpy(x), torch.from_numpy(k), up=up, down=down, pad=pad).numpy()
    np.testing.assert_allclose(ours, naive_upfirdn2d(x, k, up, down, pad), atol=1e-10)


def test_config_f_layout_matches_reference_counts():
    # rosinality config-f: 256 px -> 135 state-dict entries, 30.03M parameters; 1024 px -> 171, 30.37M
    for res, keys, params in [(256, 135, 30.03e6), (1024, 171, 30.37e6)]:
        G = Generator(resolution=res)
        sd = G.state_dict()
        assert len(sd) == keys
        n = sum(p.numel() for p in G.parameters())
        assert abs(n - params) / params < 0.001
        assert G.num_ws == 2 * int(math.log2(res)) - 2
        assert sd["convs.0.conv.blur.kernel"].shape == (4, 4)
        assert sd[f"noises.noise_{G.num_layers - 1}"].shape == (1, 1, res, res)
        assert "w_avg" not in sd  # kept out so rosinality dicts load with strict=True
        assert generator_config_from_state_dict(sd) == G.config


def test_config_inference_covers_odd_architectures():
    cfg = GeneratorConfig(resolution=128, w_dim=96, z_dim=48, n_mlp=3, channels=default_channels(128, 1, 256))
    G = Generator(cfg)
    assert generator_config_from_state_dict(G.state_dict()) == cfg
    assert cfg.channels[4] == 256 and cfg.channels[128] == 128
    assert GeneratorConfig.from_json(cfg.to_json()) == cfg


def test_bad_configs_and_shapes_are_refused():
    with pytest.raises(ValueError):
        GeneratorConfig(resolution=100)
    with pytest.raises(ValueError):
        GeneratorConfig(resolution=64, channels={4: 8, 8: 8})
    G = make_tiny_generator()
    with pytest.raises(ValueError):
        G.synthesis(torch.zeros(1, G.num_ws - 1, G.w_dim))
    with pytest.raises(ValueError):
        G.mapping(torch.zeros(2, G.z_dim + 1))
    with pytest.raises(ValueError):
        G.synthesis(torch.zeros(1, G.num_ws, G.w_dim), noise_mode="loud")
    with pytest.raises(ValueError):
        generator_config_from_state_dict({"foo": torch.zeros(1)})


@pytest.mark.parametrize("upsample", [False, True])
def test_fused_and_unfused_modulated_conv_agree(upsample):
    torch.manual_seed(0)
    conv = ModulatedConv2d(8, 6, 3, 16, upsample=upsample)
    x, w = torch.randn(3, 8, 9, 9), torch.randn(3, 16)
    conv.fused = True
    a = conv(x, w)
    conv.fused = False
    b = conv(x, w)
    assert a.shape == b.shape == (3, 6, 18 if upsample else 9, 18 if upsample else 9)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_batch_members_are_independent_and_noise_modes_behave():
    G = make_tiny_generator()
    ws = torch.randn(3, G.num_ws, G.w_dim)
    with torch.no_grad():
        batch = G.synthesis(ws)
        single = torch.cat([G.synthesis(ws[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)
        assert batch.shape == (3, 3, G.resolution, G.resolution)
        torch.testing.assert_close(G.synthesis(ws), batch)  # const noise is deterministic
        assert not torch.allclose(G.synthesis(ws, noise_mode="random"), batch)
        none = G.synthesis(ws, noise_mode="none")
        assert not torch.allclose(none, batch)
        zero = [torch.zeros_like(b) for b in G.noise_buffers()]
        torch.testing.assert_close(G.synthesis(ws, noise=zero), none)


def test_truncation_pulls_to_w_avg():
    G = make_tiny_generator()
    z = torch.randn(4, G.z_dim)
    w = G.mapping(z)
    torch.testing.assert_close(G.mapping(z, truncation_psi=0.0), G.w_avg.expand(4, -1))
    half = G.mapping(z, truncation_psi=0.5)
    assert ((half - G.w_avg).norm(dim=1) < (w - G.w_avg).norm(dim=1)).all()
    # G.w_avg is the mean of mapped samples
    sample_mean = G.style(torch.randn(4000, G.z_dim)).mean(0)
    torch.testing.assert_close(G.compute_w_avg(4000, seed=3), sample_mean, atol=0.05, rtol=0)


def test_gradients_reach_latents_and_noise():
    G = make_tiny_generator()
    ws = torch.randn(2, G.num_ws, G.w_dim, requires_grad=True)
    noise = [b.clone().requires_grad_(True) for b in G.noise_buffers()]
    G.synthesis(ws, noise=noise).square().mean().backward()
    assert ws.grad is not None and ws.grad.abs().sum() > 0
    assert all(n.grad is not None for n in noise)


def test_bfloat16_synthesis_tracks_float32():
    G = make_tiny_generator()
    ws = torch.randn(2, G.num_ws, G.w_dim)
    with torch.no_grad():
        ref = G.synthesis(ws)
        low = G.to(torch.bfloat16).synthesis(ws.to(torch.bfloat16)).float()
    assert torch.isfinite(low).all()
    assert (low - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_discriminator_layout_and_features():
    D = Discriminator(resolution=256)
    sd = D.state_dict()
    assert {"convs.0.0.weight", "convs.1.conv2.1.weight", "convs.1.skip.1.weight", "final_linear.1.bias"} <= set(sd)
    assert discriminator_channels_from_state_dict(sd) == (256, D.channels)
    cfg = tiny_config(32)
    Ds = Discriminator(resolution=32, channels=cfg.channels)
    x = torch.randn(4, 3, 32, 32)
    feats = Ds.features(x)
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4]
    assert Ds(x).shape == (4, 1)
    with pytest.raises(ValueError):
        Ds(torch.randn(6, 3, 32, 32))  # batch not divisible by the stddev group
    with pytest.raises(ValueError):
        Ds(torch.randn(4, 3, 16, 16))


def test_blur_kernel_normalisation():
    k = make_kernel((1, 3, 3, 1))
    assert k.shape == (4, 4) and abs(k.sum().item() - 1) < 1e-6
