import pytest
import torch

from gan.perceptual import DiscriminatorFeatureLoss
from gan.projection import (
    MEMORY_HEADROOM,
    ProjectionCancelledError,
    ProjectionConfig,
    ProjectionMemoryError,
    faces_per_pass,
    latent_stats,
    learning_rate,
    noise_regularization,
    project_batch,
    projection_bytes_per_face,
)
from tests.conftest import make_tiny_discriminator, make_tiny_generator


def pixel_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).square().mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def setup():
    G = make_tiny_generator(5)
    with torch.no_grad():
        for name, p in G.named_parameters():  # trained generators have weak noise inputs; so should this one
            if name.endswith("noise.weight"):
                p.mul_(0.1)
        z = torch.randn(3, G.z_dim, generator=torch.Generator().manual_seed(11))
        ws = G.mapping(z).unsqueeze(1).expand(-1, G.num_ws, -1)
        targets = G.synthesis(ws, noise_mode="random")
    return G, targets


def test_learning_rate_schedule_shape():
    cfg = ProjectionConfig(lr=0.1)
    assert learning_rate(0.0, cfg) == 0.0
    assert learning_rate(0.05, cfg) == pytest.approx(0.1)
    assert learning_rate(0.5, cfg) == pytest.approx(0.1)
    assert 0 < learning_rate(0.9, cfg) < 0.1
    assert learning_rate(1.0, cfg) == pytest.approx(0.0)


def test_noise_regularization_prefers_white_noise():
    g = torch.Generator().manual_seed(0)
    white = [torch.randn(2, 1, 32, 32, generator=g)]
    smooth = [torch.nn.functional.interpolate(torch.randn(2, 1, 8, 8, generator=g), size=32, mode="bilinear")]
    assert (noise_regularization(smooth) > 10 * noise_regularization(white)).all()


def test_projection_reduces_loss_a_lot(setup):
    G, targets = setup
    res = project_batch(G, targets, pixel_loss, ProjectionConfig(steps=80))
    first, last = res.losses[0], res.losses[-1]
    assert (last < 0.2 * first).all(), (first, last)
    assert res.ws.shape == (3, G.num_ws, G.w_dim)
    # the returned renders are what the latents and noise produce, and match the recorded final loss closely
    assert (pixel_loss(res.images, targets) < 0.5 * first).all()
    # mostly downhill: the loss over the last quarter is below the first quarter's for every photo
    q = len(res.losses) // 4
    assert (res.losses[-q:].mean(0) < res.losses[:q].mean(0)).all()


def test_batched_equals_per_image(setup):
    G, targets = setup
    cfg = ProjectionConfig(steps=15, lr=0.05)
    batch = project_batch(G, targets, pixel_loss, cfg, seeds=[7, 8, 9])
    for i, seed in enumerate([7, 8, 9]):
        alone = project_batch(G, targets[i : i + 1], pixel_loss, cfg, seeds=[seed])
        torch.testing.assert_close(alone.ws[0], batch.ws[i], atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(alone.losses[:, 0], batch.losses[:, i], atol=1e-4, rtol=1e-3)


def test_w_space_uses_one_latent_and_init_is_respected(setup):
    G, targets = setup
    w_avg, _ = latent_stats(G)
    res = project_batch(G, targets[:1], pixel_loss, ProjectionConfig(steps=3, space="w"))
    assert torch.equal(res.ws[0, 0], res.ws[0, -1])  # one w broadcast to every layer
    init = w_avg.expand(1, G.num_ws, -1) + 0.3
    zero = project_batch(G, targets[:1], pixel_loss, ProjectionConfig(steps=0), init_ws=init)
    torch.testing.assert_close(zero.ws, init)


def test_progress_and_cancellation(setup):
    G, targets = setup
    seen = []
    project_batch(
        G, targets[:2], pixel_loss, ProjectionConfig(steps=4), progress=lambda s, t, _loss: seen.append((s, t))
    )
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    calls = iter(range(100))
    with pytest.raises(ProjectionCancelledError):
        project_batch(G, targets[:1], pixel_loss, ProjectionConfig(steps=50), should_cancel=lambda: next(calls) >= 3)


def test_projection_with_discriminator_fallback_loss(setup):
    G, targets = setup
    loss = DiscriminatorFeatureLoss(make_tiny_discriminator(1))
    res = project_batch(G, targets[:2], loss, ProjectionConfig(steps=30))
    assert (res.losses[-1] < 0.5 * res.losses[0]).all()


def test_bad_target_shape(setup):
    G, _ = setup
    with pytest.raises(ValueError):
        project_batch(G, torch.zeros(1, 3, 16, 16), pixel_loss)
    with pytest.raises(ValueError):
        project_batch(G, torch.zeros(2, 3, 32, 32), pixel_loss, seeds=[1])


# ----------------------------------------------------------------------------------------------------------
# Targets' features once per pass; memory per face and faces per pass


class CountingLoss(DiscriminatorFeatureLoss):
    def __init__(self, D) -> None:
        super().__init__(D)
        self.embedded: list[bool] = []  # requires_grad of each embedded batch

    def embed(self, images: torch.Tensor) -> list[torch.Tensor]:
        self.embedded.append(images.requires_grad)
        return super().embed(images)


def test_targets_are_embedded_once_per_pass_with_the_same_result(setup):
    G, targets = setup
    cfg = ProjectionConfig(steps=4)
    loss = CountingLoss(make_tiny_discriminator(2))
    cached = project_batch(G, targets, loss, cfg, seeds=[1, 2, 3])
    assert loss.embedded == [False] + [True] * 4  # the targets once, then the renders each step

    class Plain(torch.nn.Module):  # the same loss without embed/compare: the targets embedded every step
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, a, b):
            return self.inner(a, b)

    plain = project_batch(G, targets, Plain(DiscriminatorFeatureLoss(make_tiny_discriminator(2))), cfg, seeds=[1, 2, 3])
    assert torch.equal(cached.ws, plain.ws) and torch.equal(cached.losses, plain.losses)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass while ``fn`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("fused", [True, False])
def test_memory_estimate_bounds_what_autograd_saves(resolution, fused):
    from gan.networks import set_modulated_conv_form

    G = set_modulated_conv_form(make_tiny_generator(1, resolution), fused)
    loss = DiscriminatorFeatureLoss(make_tiny_discriminator(2, resolution))
    n = 2
    ws = G.w_avg.expand(n, G.num_ws, -1).clone().requires_grad_(True)
    targets = torch.rand(n, 3, resolution, resolution)
    measured = _saved_bytes(lambda: loss(G.synthesis(ws), targets)) / n
    estimate = projection_bytes_per_face(G.config)
    assert measured <= estimate <= 3 * measured


def test_faces_per_pass_grows_with_memory_and_is_capped():
    from gan.networks import GeneratorConfig

    config = GeneratorConfig(resolution=1024)  # config-f
    per_face = projection_bytes_per_face(config)
    counts = [faces_per_pass(gib * 2**30, config, max_faces=64) for gib in (6, 12, 24, 40, 80, 141)]
    assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] > counts[0]
    assert faces_per_pass(22 * 2**30, config, max_faces=64) >= 1  # a 24 GiB card serves 1024 px
    assert faces_per_pass(10**15, config, max_faces=16) == 16
    assert faces_per_pass(int(per_face / MEMORY_HEADROOM) + 1, config) == 1
    with pytest.raises(ProjectionMemoryError, match=r"1024 px needs about .* GiB"):
        faces_per_pass(int(per_face / MEMORY_HEADROOM) - 2**20, config)
    # fewer pixels, more faces; fast mode (no optimisation) fits many more
    small = GeneratorConfig(resolution=256)
    assert faces_per_pass(24 * 2**30, small, max_faces=256) > 2 * faces_per_pass(24 * 2**30, config, max_faces=256)
    assert faces_per_pass(24 * 2**30, config, steps=0, max_faces=256) > faces_per_pass(
        24 * 2**30, config, max_faces=256
    )
