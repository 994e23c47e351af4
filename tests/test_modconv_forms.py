"""The two forms of the modulated convolution (grouped per-sample weights, shared weight) agree in outputs
and gradients; the per-device choice; CUDA projection matches CPU (skipped without CUDA)."""

from __future__ import annotations

import copy

import pytest
import torch

from gan.networks import ModulatedConv2d, set_modulated_conv_form
from gan.perceptual import DiscriminatorFeatureLoss
from gan.projection import ProjectionConfig, project_batch
from tests.conftest import make_tiny_discriminator, make_tiny_generator, randomise

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _grads(module: torch.nn.Module, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return [t.grad.clone() for t in inputs] + [p.grad.clone() for p in module.parameters() if p.grad is not None]


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize(
    "kernel,upsample,demodulate", [(3, False, True), (3, True, True), (1, False, False), (3, True, False)]
)
def test_layer_forms_agree_in_output_and_gradients(batch: int, kernel: int, upsample: bool, demodulate: bool) -> None:
    torch.manual_seed(batch + 10 * kernel)
    layer = randomise(ModulatedConv2d(6, 5, kernel, 8, demodulate=demodulate, upsample=upsample), seed=3)
    results = []
    for fused in (True, False):
        m = set_modulated_conv_form(copy.deepcopy(layer), fused)
        x = torch.randn(batch, 6, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        w = torch.randn(batch, 8, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        out = m(x, w)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), _grads(m, x, w)))
    (out_g, grads_g), (out_s, grads_s) = results
    assert out_g.shape == (batch, 5, 16 if upsample else 8, 16 if upsample else 8)
    torch.testing.assert_close(out_g, out_s, rtol=1e-5, atol=1e-5)
    assert len(grads_g) == len(grads_s) >= 4  # x, w, the weight and the modulation's weight and bias
    for a, b in zip(grads_g, grads_s, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 4])
def test_generator_and_discriminator_gradients_agree_across_forms(batch: int) -> None:
    """Up-sampling synthesis layers, the RGB skips and D's down-sampling blocks, end to end."""
    G, D = make_tiny_generator(2), make_tiny_discriminator(4)
    ws = torch.randn(batch, G.num_ws, G.w_dim, generator=torch.Generator().manual_seed(5))
    results = []
    for fused in (True, False):
        Gf = set_modulated_conv_form(copy.deepcopy(G), fused).requires_grad_(True)
        w = ws.clone().requires_grad_(True)
        img = Gf.synthesis(w, noise_mode="const")
        Df = copy.deepcopy(D).requires_grad_(True)
        sum(f.square().mean() for f in Df.features(img)).backward()
        params = [*Gf.parameters(), *Df.parameters()]  # the mapping network takes no part: no gradient
        results.append((img.detach(), [w.grad.clone()] + [p.grad.clone() for p in params if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=2e-5)
    assert len(results[0][1]) == len(results[1][1]) > 40  # w, every synthesis layer, every D block
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_default_choice_on_cpu_is_unchanged() -> None:
    """CPU: the grouped form for one sample, the shared form for batches (the faster ones on CPU)."""
    layer = ModulatedConv2d(4, 4, 3, 8)
    calls = []
    handle = torch.nn.functional.conv2d

    def spy(x, weight, *args, **kwargs):
        calls.append(kwargs.get("groups", 1))
        return handle(x, weight, *args, **kwargs)

    torch.nn.functional.conv2d = spy
    try:
        layer(torch.randn(1, 4, 8, 8), torch.randn(1, 8))
        layer(torch.randn(3, 4, 8, 8), torch.randn(3, 8))
    finally:
        torch.nn.functional.conv2d = handle
    assert calls == [1, 1]  # batch 1: groups = batch = 1 (grouped form); batch 3: the shared weight
    assert layer.fused is None


@CUDA
def test_cuda_chooses_the_grouped_form_and_matches_cpu() -> None:
    layer = randomise(ModulatedConv2d(6, 5, 3, 8, upsample=True), seed=1)
    x, w = torch.randn(4, 6, 8, 8), torch.randn(4, 8)
    cpu = layer(x, w)
    gpu = copy.deepcopy(layer).cuda()(x.cuda(), w.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)


@CUDA
def test_cuda_projection_matches_cpu() -> None:
    G, D = make_tiny_generator(5), make_tiny_discriminator(6)
    with torch.no_grad():
        targets = G.synthesis(G.w_avg.expand(2, G.num_ws, -1) + 0.3, noise_mode="random")
    cfg = ProjectionConfig(steps=10)
    cpu = project_batch(G, targets, DiscriminatorFeatureLoss(copy.deepcopy(D)), cfg, seeds=[1, 2])
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 on both sides
    try:
        Gc, Dc = copy.deepcopy(G).cuda(), copy.deepcopy(D).cuda()
        gpu = project_batch(Gc, targets.cuda(), DiscriminatorFeatureLoss(Dc), cfg, seeds=[1, 2])
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.testing.assert_close(gpu.ws.cpu(), cpu.ws, rtol=1e-3, atol=5e-3)
    torch.testing.assert_close(gpu.images.cpu(), cpu.images, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(gpu.losses, cpu.losses, rtol=1e-3, atol=1e-4)
