import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gan.align import FaceAligner, NoFaceError
from gan.blending import BlendSpec
from gan.imageio import BadImageError
from gan.pipeline import ModeSettings, Toonifier
from tests.conftest import make_tiny_generator

FIXTURE = Path(__file__).parent / "fixtures" / "astronaut.png"


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


class CountingLoss:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (a - b).square().mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def aligner() -> FaceAligner:
    return FaceAligner(min_face_size=40)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.open(FIXTURE).convert("RGB")


@pytest.fixture
def toonifier(aligner) -> Toonifier:
    base, toon = make_tiny_generator(0), make_tiny_generator(1)
    return Toonifier(
        base,
        toon,
        spec=BlendSpec(mode="swap", resolution=8),
        loss_fn=CountingLoss(),
        aligner=aligner,
        modes={"balanced": ModeSettings(use_encoder=True, steps=3), "quality": ModeSettings(use_encoder=True, steps=6)},
    )


def test_toonify_a_portrait(toonifier, astronaut):
    stages = []
    res = toonifier.toonify(png_bytes(astronaut), progress=lambda s, i, n: stages.append(s))
    assert len(res.crops) == 1 and res.crops[0].size == (32, 32)
    assert res.latents.shape == (1, toonifier.base.num_ws, toonifier.base.w_dim)
    assert res.composite.size == astronaut.size
    before, after = np.asarray(astronaut, dtype=np.int16), np.asarray(res.composite, dtype=np.int16)
    changed = np.abs(after - before).sum(axis=2) > 0
    assert changed.sum() > 1000  # the face was replaced
    x0, y0, x1, y1 = res.aligned[0].face.box
    assert not changed[:, : max(0, int(x0) - 150)].any()  # far from the face nothing moved
    assert changed[int(y0) : int(y1), int(x0) : int(x1)].mean() > 0.5
    assert {"align", "project", "render", "paste"} <= set(stages)
    assert set(res.timings) == {"align", "project", "render", "paste"}
    assert res.losses is not None and res.losses.shape == (1,)


def test_reblend_reuses_latents_without_projection(toonifier, astronaut):
    first = toonifier.toonify(astronaut)
    calls = toonifier.loss_fn.calls
    again = toonifier.toonify(astronaut, latents=first.latents, spec=BlendSpec(mode="swap", resolution=16))
    assert toonifier.loss_fn.calls == calls  # no projection step ran
    assert not np.array_equal(np.asarray(again.crops[0]), np.asarray(first.crops[0]))
    same = toonifier.toonify(astronaut, latents=first.latents)
    assert np.array_equal(np.asarray(same.crops[0]), np.asarray(first.crops[0]))
    assert toonifier.blended() is toonifier.blended(BlendSpec(mode="swap", resolution=8))  # cached


def test_group_photo_toonifies_every_face(toonifier, astronaut):
    group = Image.new("RGB", (astronaut.width * 3, astronaut.height))
    for i in range(3):
        face = astronaut if i != 1 else astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        group.paste(face, (i * astronaut.width, 0))
    res = toonifier.toonify(group)
    assert len(res.crops) == 3
    centres = sorted((f.face.box[0] + f.face.box[2]) / 2 for f in res.aligned)
    assert [int(c // astronaut.width) for c in centres] == [0, 1, 2]
    assert len(toonifier.toonify(group, all_faces=False).crops) == 1


def test_modes_and_bad_inputs(toonifier, astronaut):
    with pytest.raises(ValueError, match="encoder"):
        toonifier.toonify(astronaut, mode="fast")
    with pytest.raises(ValueError, match="unknown mode"):
        toonifier.toonify(astronaut, mode="turbo")
    with pytest.raises(BadImageError):
        toonifier.toonify(b"definitely not an image")
    with pytest.raises(NoFaceError):
        toonifier.toonify(Image.new("RGB", (300, 300), (120, 160, 200)))
    res = toonifier.toonify(astronaut)
    with pytest.raises(ValueError, match="faces"):
        toonifier.toonify(astronaut, latents=torch.cat([res.latents, res.latents]))


def test_encoder_initialisation_is_used(toonifier, astronaut):
    target = toonifier.base.w_avg.expand(1, toonifier.base.num_ws, -1) + 0.5
    toonifier.encoder = lambda crops: target.expand(crops.shape[0], -1, -1)
    fast = toonifier.toonify(astronaut, mode="fast")
    torch.testing.assert_close(fast.latents, target)
    assert fast.losses is None


def test_cli_toon_and_project(tmp_path, astronaut):
    from gan.cli import main as cli_main

    assert cli_main(["demo", "--out", str(tmp_path / "m")]) == 0
    photo = tmp_path / "astronaut.jpg"
    astronaut.save(photo, quality=92)
    models = ["--base", str(tmp_path / "m/base.safetensors")]
    out = tmp_path / "out.png"
    args = ["toon", str(photo), *models, "--toon", str(tmp_path / "m/toon.pt"), "--swap", "16"]
    assert cli_main([*args, "--steps", "2", "--min-face-size", "40", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == astronaut.size
    with Image.open(tmp_path / "out_toon0.png") as im:
        assert im.size == (64, 64)
    assert (tmp_path / "out_face0.png").is_file()
    lat = tmp_path / "lat.pt"
    assert cli_main(["project", str(photo), *models, "--steps", "2", "--out", str(lat)]) == 0
    saved = torch.load(lat, weights_only=True)
    assert saved["latents"].shape == (1, 10, 64)
    # bad input: a message and exit code 2, not a traceback
    (tmp_path / "note.txt").write_text("hello")
    assert (
        cli_main(
            ["toon", str(tmp_path / "note.txt"), *models, "--toon", str(tmp_path / "m/toon.pt"), "--out", str(out)]
        )
        == 2
    )
    assert cli_main(["toon", str(photo), "--style", "nope", "--out", str(out)]) == 2
