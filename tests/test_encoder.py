import argparse
import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gan.checkpoints import CheckpointError, load_discriminator, load_generator, save_generator
from gan.encoder import (
    FIXTURES,
    Encoder,
    EncoderMismatchError,
    EncoderTrainingCancelledError,
    add_train_encoder_parser,
    default_portraits,
    encode,
    encoder_report,
    identity_scores,
    load_encoder,
    load_real_faces,
    real_count,
    render,
    render_chunk,
    save_encoder,
    train_encoder,
)
from gan.images import from_uint8
from gan.networks import Generator, GeneratorConfig
from gan.projection import ProjectionConfig, project_batch
from gan.styles import get_style
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


# ---------------------------------------------------------------------------------------------- real faces, resume


def _write_faces(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` readable images of assorted sizes and formats (one non-square, one in a sub-folder), plus a
    truncated PNG, a text file and a hidden file that must be skipped."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (48, 40) if i == 1 else (24 + 8 * (i % 3),) * 2
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        where = folder / "more" if i == n - 1 else folder
        where.mkdir(exist_ok=True)
        im.save(where / f"face{i}.{'jpg' if i % 2 else 'png'}")
    png = (folder / "face0.png").read_bytes()
    (folder / "cut.png").write_bytes(png[: len(png) // 2])
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    return folder


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_faces(tmp_path_factory.mktemp("real") / "faces", 5)


def test_real_faces_load_safely_and_bounded(faces_dir, tmp_path):
    real = load_real_faces(faces_dir, 32)
    assert len(real) == 5 and real.size == 32 and real.images.dtype == torch.uint8
    assert real.images.shape == (5, 32, 32, 3)
    assert real.skipped == {"truncated": 1, "not_an_image": 1, "hidden": 1}
    again = load_real_faces(faces_dir, 32)
    assert again.digest == real.digest  # same files, same pixels, same order
    few = load_real_faces(faces_dir, 16, max_images=2)
    assert len(few) == 2 and few.size == 16 and few.digest != real.digest
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no usable face images.*the folder is empty"):
        load_real_faces(empty, 32)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("hello")
    (junk / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ValueError, match=r"no usable face images in .*junk \(.*not_an_image"):
        load_real_faces(junk, 32)
    with pytest.raises(ValueError, match="not a folder"):
        load_real_faces(tmp_path / "missing", 32)


def test_real_share_is_exact_over_steps():
    assert [real_count(s, 2, 0.25) for s in range(8)] == [0, 1] * 4  # batch 2 at 0.25: one every other step
    assert [real_count(s, 8, 0.25) for s in range(3)] == [2, 2, 2]
    assert sum(real_count(s, 8, 0.3) for s in range(10)) == 24
    assert real_count(0, 4, 0.0) == 0 and real_count(5, 4, 1.0) == 4


def test_real_faces_join_the_batches_with_image_loss_only(faces_dir):
    G = make_tiny_generator(3)
    real = load_real_faces(faces_dir, G.resolution)
    targets: list[torch.Tensor] = []

    def spy_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        targets.append(target.detach().clone())
        return pixel_loss(recon, target)

    kw = dict(steps=3, seed=2, fit_samples=64, **FAST)
    plain = train_encoder(G, **kw)
    mixed = train_encoder(G, loss_fn=spy_loss, real_faces=real, real_share=0.5, **kw)
    assert any(
        not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), mixed.state_dict().values(), strict=True)
    )
    reals = from_uint8(real.images)
    for target in targets:  # every batch: 4 generated faces, then 4 of the real ones
        assert target.shape == (8, 3, 32, 32)
        for face in target[4:]:
            assert any(torch.equal(face, r) for r in reals)
        assert not any(torch.equal(face, r) for face in target[:4] for r in reals)
    assert mixed.train_settings["real_faces"]["count"] == 5 and mixed.train_settings["real_share"] == 0.5
    with pytest.raises(ValueError, match="image_weight"):
        train_encoder(G, real_faces=real, image_weight=0.0, **kw)
    with pytest.raises(ValueError, match="real_share"):
        train_encoder(G, real_faces=real, real_share=1.5, **kw)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_cancel_then_resume_is_bit_identical_to_an_unbroken_run(faces_dir, tmp_path):
    G = make_tiny_generator(4)
    real = load_real_faces(faces_dir, G.resolution)
    kw = dict(steps=7, seed=3, fit_samples=64, real_faces=real, real_share=0.25, snapshot_every=2, **FAST)
    unbroken = train_encoder(G, **kw)
    snap, calls = tmp_path / "enc.safetensors.snapshot", {"n": 0}

    def cancel_at_fourth_check() -> bool:
        calls["n"] += 1
        return calls["n"] == 4

    with pytest.raises(EncoderTrainingCancelledError, match="step 3/7"):
        train_encoder(G, snapshot_path=snap, should_cancel=cancel_at_fourth_check, **kw)
    assert snap.exists()
    seen = []
    resumed = train_encoder(G, snapshot_path=snap, resume=True, progress=lambda s, t, _l: seen.append(s), **kw)
    assert seen == [4, 5, 6, 7]  # continued from the snapshot, not restarted
    _same_weights(unbroken, resumed)
    finished = train_encoder(G, snapshot_path=snap, resume=True, progress=lambda *a: seen.append(a), **kw)
    assert seen == [4, 5, 6, 7]  # the final snapshot: nothing left to do, the same encoder
    _same_weights(unbroken, finished)

    # a snapshot is only continued with the settings, generator and real faces it was made with
    with pytest.raises(ValueError, match="batch_size=8, not 4"):
        train_encoder(G, snapshot_path=snap, resume=True, **(kw | {"batch_size": 4}))
    with pytest.raises(ValueError, match="real_faces"):
        other = load_real_faces(faces_dir, G.resolution, max_images=3)
        train_encoder(G, snapshot_path=snap, resume=True, **(kw | {"real_faces": other}))
    with pytest.raises(EncoderMismatchError, match="another generator"):
        train_encoder(make_tiny_generator(9), snapshot_path=snap, resume=True, **kw)

    # without resume a stale snapshot is deleted, never read: garbage there is no error
    snap.write_bytes(b"garbage from an old run")
    with pytest.raises(CheckpointError):
        train_encoder(G, snapshot_path=snap, resume=True, **kw)
    fresh = train_encoder(G, snapshot_path=snap, **kw)
    _same_weights(unbroken, fresh)


def test_bf16_flag_is_a_no_op_on_cpu():
    G = make_tiny_generator(1)
    a = train_encoder(G, steps=2, seed=1, fit_samples=32, bf16=True, **FAST)
    b = train_encoder(G, steps=2, seed=1, fit_samples=32, bf16=False, **FAST)
    _same_weights(a, b)
    assert a.train_settings["bf16"] is False  # recorded as what ran: autocast is CUDA-only


# ---------------------------------------------------------------------------------------------- resolutions


def test_a_1024_px_generator_trains_and_compares_images_at_256():
    chans = {4: 16, 8: 16, 16: 8, 32: 8, 64: 4, 128: 4, 256: 2, 512: 2, 1024: 2}  # narrow: fast on one CPU core
    G = Generator(GeneratorConfig(resolution=1024, w_dim=32, z_dim=32, n_mlp=2, channels=chans)).eval()
    G.compute_w_avg(n=256)
    seen: list[tuple] = []

    def spy_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seen.append((tuple(recon.shape), tuple(target.shape)))
        return pixel_loss(recon, target)

    losses = []
    enc = train_encoder(G, steps=2, batch_size=2, fit_samples=8, channels=8, max_channels=16, loss_fn=spy_loss,
                        progress=lambda s, t, loss: losses.append(loss))  # fmt: skip
    assert enc.input_size == 256 and len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert seen == [((2, 3, 256, 256), (2, 3, 256, 256))] * 2  # both sides area-downsampled to 256 px
    assert render_chunk(1024) == 4 and render_chunk(256) == 64 and render_chunk(64) == 64
    with torch.no_grad():
        photo = render(G, G.w_avg.expand(1, G.num_ws, -1))
    ws = encode(enc, photo)
    assert ws.shape == (1, G.num_ws, 32)
    assert render(G, ws).shape == (1, 3, 1024, 1024)
    report = encoder_report(enc, G, holdout=2, portraits=[], quiet=True)
    assert math.isfinite(report["generated"]["psnr"]) and report["generated"]["dfeat"] is None


def test_a_256_px_config_f_encoder_trains_a_step():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        G = Generator(GeneratorConfig(resolution=256)).eval()  # config-f: full width, random weights
    G.compute_w_avg(n=256)
    losses = []
    enc = train_encoder(G, steps=1, batch_size=1, fit_samples=0, progress=lambda s, t, loss: losses.append(loss))
    assert enc.input_size == 256 and enc.num_ws == 14 and enc.w_dim == 512
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert sum(p.numel() for p in enc.parameters()) > 1_000_000  # the default width, not a toy


# ---------------------------------------------------------------------------------------------- report, CLI


@pytest.fixture(scope="module")
def demo_models():
    style = get_style("demo")
    G = load_generator(style.base)
    return style, G, load_encoder(style.encoder, G)


def test_report_on_the_demo_models(demo_models):
    style, G, enc = demo_models
    out = io.StringIO()
    report = encoder_report(enc, G, discriminator=load_discriminator(style.base), holdout=4, file=out)
    gen, real = report["generated"], report["real"]
    assert gen["faces"] == 4 and not gen["same_as_training_seed"]
    assert 15 < gen["psnr_min"] <= gen["psnr"] < 60, gen  # the demo encoder reconstructs its own faces
    assert 0 <= gen["dfeat"] <= gen["dfeat_max"] < 10 and math.isfinite(gen["latent_mse"]), gen
    portraits = default_portraits()
    assert "astronaut.png" in [p.name for p in portraits]
    assert real["faces"] == len(portraits) and real["aligned"] == len(portraits)
    assert real["inputs_readable"] == len(portraits)  # dlib reads every aligned photo
    assert 5 < real["psnr"] < 60 and 0 <= real["dfeat"] < 10, real
    astronaut = next(r for r in real["images"] if r["name"] == "astronaut.png")
    assert 0 < astronaut["identity_photo_box"] < 2, astronaut  # descriptors are unit-scale; never identical
    assert astronaut["identity"] is None or 0 <= astronaut["identity"] < 2
    text = out.getvalue()
    assert "generated (4 held out" in text and "astronaut.png: PSNR" in text and "photo's box" in text


def test_identity_scores_are_zero_for_the_photo_itself():
    from gan.align import FaceAligner
    from gan.imageio import load_image

    face = FaceAligner().align_all(load_image(FIXTURES / "astronaut.png"), output_size=64, largest_only=True)[0]
    photo = from_uint8(np.array(face.image)[None])
    same = identity_scores(photo, photo)
    assert same["identity"] == 0 and same["identity_photo_box"] == 0 and same["readable"] == 1
    noise = torch.rand_like(photo, generator=torch.Generator().manual_seed(0)) * 2 - 1
    other = identity_scores(photo, noise)
    assert other["readable"] == 0 and other["identity"] is None  # dlib finds no face in noise ...
    assert other["identity_photo_box"] > 0.3  # ... and in the photo's box it is far from the person


@pytest.mark.filterwarnings("ignore:no perceptual weights and no discriminator")  # the tiny base has no D
def test_cli_trains_with_real_faces_resumes_and_reports(faces_dir, tmp_path, capsys, monkeypatch):
    import contextlib

    import gan.encoder

    # gan.cli is not imported here: its TerminalProgress binds sys.stderr as a default argument at import time,
    # and under capsys that stream is closed after this test (a later `toonify toon` test would then fail).
    parser = argparse.ArgumentParser()
    add_train_encoder_parser(parser.add_subparsers(dest="command"))

    def cli_main(argv: list[str]) -> int:
        args = parser.parse_args(argv)
        return args.func(args)

    base = save_generator(make_tiny_generator(2), tmp_path / "base.safetensors")

    def train_argv(out: Path, *extra: str) -> list[str]:
        return ["train-encoder", str(base), "--out", str(out), "--steps", "3", "--batch", "4", "--fit-samples",
                "32", "--real-max", "3", "--device", "cpu", *extra]  # fmt: skip

    out, report = tmp_path / "enc.safetensors", tmp_path / "report.json"
    snap = tmp_path / "enc.safetensors.snapshot"
    snap.write_bytes(b"stale")  # a fresh run (no --resume) deletes it
    argv = train_argv(out, "--real-faces", str(faces_dir), "--report", str(report), "--holdout", "2")
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert "real faces: 3 from" in err and "skipped: " in err and "step 3/3" in err and "wrote" in err
    assert not snap.exists()  # written during the run, removed once the encoder is saved
    enc = load_encoder(out, load_generator(base))
    training = enc.meta["training"]
    assert training["real_faces"]["count"] == 3 and training["loss"] == "pixel"  # no D in the file: pixel terms
    data = json.loads(report.read_text())
    assert data["generated"]["faces"] == 2 and math.isfinite(data["generated"]["psnr"])
    assert data["real"]["faces"] == len(default_portraits())

    # Ctrl-C (here: the interrupt flag set before the second step) leaves a snapshot; --resume finishes the run
    @contextlib.contextmanager
    def interrupted_once():
        calls = {"n": 0}

        def flag() -> bool:
            calls["n"] += 1
            return calls["n"] == 2

        yield flag

    out2 = tmp_path / "enc2.safetensors"
    with monkeypatch.context() as m:
        m.setattr(gan.encoder, "_cancel_on_interrupt", interrupted_once)
        assert cli_main(train_argv(out2, "--real-faces", str(faces_dir))) == 130
    assert "cancelled at step 1/3" in capsys.readouterr().err and not out2.exists()
    assert (tmp_path / "enc2.safetensors.snapshot").exists()
    assert cli_main(train_argv(out2, "--real-faces", str(faces_dir), "--resume")) == 0
    err = capsys.readouterr().err
    assert "step 1/3" not in err and "step 3/3" in err
    _same_weights(load_encoder(out2), enc)  # the interrupted run ends where the unbroken one did

    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(ValueError, match="no usable face images"):  # gan.cli.run prints it, exit status 2
        cli_main(train_argv(tmp_path / "e.safetensors", "--real-faces", str(empty)))

    portrait = str(FIXTURES / "astronaut.png")
    argv = ["encoder-report", str(base), str(out), "--holdout", "2", "--portraits", portrait, "--json",
            str(tmp_path / "r2.json")]  # fmt: skip
    assert cli_main(argv) == 0
    assert "encoder report: generator 32 px" in capsys.readouterr().out
    again = json.loads((tmp_path / "r2.json").read_text())
    assert again["generated"] == data["generated"]  # same held-out seed: the same numbers
