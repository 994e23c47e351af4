import argparse
import copy

import pytest
import torch

from gan.checkpoints import CheckpointError, load_generator, save_generator
from gan.encoder import (
    Encoder,
    EncoderMismatchError,
    EncoderTrainingCancelledError,
    add_train_encoder_parser,
    encode,
    load_encoder,
    save_encoder,
    train_encoder,
)
from gan.projection import ProjectionConfig, project_batch
from tests.conftest import make_tiny_generator

FAST = dict(batch_size=8, lr=2e-3, channels=16, max_channels=32)  # small enough to train in seconds on CPU


def pixel_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).square().mean(dim=(1, 2, 3))


def weak_noise_generator(seed: int) -> torch.nn.Module:
    G = make_tiny_generator(seed)
    with torch.no_grad():
        for name, p in G.named_parameters():  # trained generators have weak noise inputs; so should this one
            if name.endswith("noise.weight"):
                p.mul_(0.1)
    return G


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small convolutions gain nothing from a second thread, and on a shared 2-core machine a busy core makes
    # torch's threads spin-wait: 10-20x slower. One thread keeps the module fast whatever else is running.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(one_thread):
    G = weak_noise_generator(5)
    enc = train_encoder(G, steps=200, seed=0, fit_samples=1024, image_weight=0.1, **FAST)
    with torch.no_grad():  # held-out: plain W samples (what a photo's projection mostly looks like), random noise
        z = torch.randn(32, G.z_dim, generator=torch.Generator().manual_seed(123))
        ws = G.mapping(z).unsqueeze(1).expand(-1, G.num_ws, -1).contiguous()
        images = G.synthesis(ws, noise=G.make_noise(32, generator=torch.Generator().manual_seed(7)))
    return G, enc, ws, images


@pytest.mark.parametrize("resolution,num_ws", [(8, 4), (16, 6), (32, 8), (64, 10)])
def test_shapes_and_resizing(resolution, num_ws):
    enc = Encoder(resolution, num_ws, 24, channels=8, max_channels=16)
    for size in (resolution, 2 * resolution, 20):  # own size, larger (area) and odd sizes are all accepted
        assert enc(torch.rand(2, 3, size, size) * 2 - 1).shape == (2, num_ws, 24)
    assert encode(enc, torch.zeros(5, 3, resolution, resolution), batch_size=2).shape == (5, num_ws, 24)
    assert Encoder(1024, 18, 512).input_size == 256  # big generators are encoded from a 256 px view


def test_zeroed_final_layers_give_w_avg():
    enc = Encoder(32, 8, 32, channels=8, max_channels=16)
    enc.w_avg.copy_(torch.randn(32))
    with torch.no_grad():
        for head in enc.heads:
            head[-1].weight.zero_()
            head[-1].bias.zero_()
    out = enc(torch.randn(3, 3, 32, 32))
    torch.testing.assert_close(out, enc.w_avg.expand(3, 8, -1))


def test_training_is_seeded_and_cancellable():
    G = make_tiny_generator(1)
    state = torch.random.get_rng_state()
    a = train_encoder(G, steps=3, seed=4, fit_samples=64, **FAST)
    b = train_encoder(G, steps=3, seed=4, fit_samples=64, **FAST)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's global RNG is left alone
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    seen = []
    with pytest.raises(EncoderTrainingCancelledError):
        train_encoder(G, steps=5, fit_samples=0, progress=lambda *a: seen.append(a), should_cancel=lambda: bool(seen))
    assert len(seen) == 1 and seen[0][:2] == (1, 5)


def test_training_learns_latents_and_images(trained):
    G, enc, ws, images = trained
    pred = encode(enc, images)
    base_latent = (ws - G.w_avg).square().mean()
    latent = (pred - ws).square().mean()
    assert latent < 0.5 * base_latent, (float(latent), float(base_latent))
    with torch.no_grad():
        base_img = pixel_loss(G.synthesis(G.w_avg.expand_as(ws)), images).mean()
        img = pixel_loss(G.synthesis(pred), images).mean()
        shortcut_only = copy.deepcopy(enc)  # the least-squares start, without what the CNN learnt
        for head in shortcut_only.heads:
            head[-1].weight.zero_()
            head[-1].bias.zero_()
        img_start = pixel_loss(G.synthesis(encode(shortcut_only, images)), images).mean()
    assert img < 0.5 * base_img, (float(img), float(base_img))
    assert img < 0.9 * img_start, (float(img), float(img_start))


def test_encoder_start_helps_projection(trained):
    G, enc, _, images = trained
    targets = images[:4]
    cfg = ProjectionConfig(steps=10, lr=0.05)
    from_avg = project_batch(G, targets, pixel_loss, cfg, seeds=[0, 1, 2, 3])
    from_enc = project_batch(G, targets, pixel_loss, cfg, init_ws=encode(enc, targets), seeds=[0, 1, 2, 3])
    assert from_enc.losses[-1].mean() < 0.7 * from_avg.losses[-1].mean(), (from_enc.losses[-1], from_avg.losses[-1])


def test_save_load_round_trip_and_generator_check(trained, tmp_path):
    G, enc, _, images = trained
    path = save_encoder(enc, tmp_path / "enc.safetensors", G)
    loaded = load_encoder(path, G)
    assert torch.equal(encode(loaded, images), encode(enc, images))
    assert loaded.train_settings["steps"] == 200
    other = make_tiny_generator(6)
    with pytest.raises(EncoderMismatchError, match="trained for generator"):
        load_encoder(path, other)
    with pytest.raises(EncoderMismatchError):
        save_encoder(enc, tmp_path / "other.safetensors", other)


def test_bad_files_are_checkpoint_errors(trained, tmp_path):
    G, enc, _, _ = trained
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not an encoder at all")
    with pytest.raises(CheckpointError):
        load_encoder(garbage)
    with pytest.raises(CheckpointError, match="not an encoder"):
        load_encoder(save_generator(G, tmp_path / "g.safetensors"))
    path = save_encoder(enc, tmp_path / "enc.safetensors", G)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits in the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="content hash"):
        load_encoder(path)


def test_cli_trains_an_encoder_the_loader_accepts(tmp_path, capsys):
    base = save_generator(make_tiny_generator(2), tmp_path / "base.safetensors")
    parser = argparse.ArgumentParser()
    add_train_encoder_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "enc.safetensors"
    argv = ["train-encoder", str(base), "--out", str(out), "--steps", "2", "--batch", "2", "--fit-samples", "64"]
    args = parser.parse_args([*argv, "--device", "cpu"])
    assert args.func(args) == 0
    err = capsys.readouterr().err
    assert "step 2/2" in err and "wrote" in err
    enc = load_encoder(out, load_generator(base))
    assert load_encoder(out, make_tiny_generator(2)).generator_hash == enc.generator_hash  # in-memory G: same hash
    assert enc.meta["training"]["steps"] == 2
