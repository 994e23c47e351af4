"""The latent-space commands (directions, name-direction, list-directions, edit, mix, sweep, interpolate) run
through ``gan.cli.main`` in-process on a copy of the bundled demo models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gan.blending import blend
from gan.checkpoints import load_generator
from gan.cli import main
from gan.editing import layer_group, load_directions, load_style_directions, mix_styles, render, seed_latents
from gan.images import make_grid
from gan.styles import get_style

DEMO = Path(__file__).resolve().parents[1] / "gan" / "demo_models"
FIXTURE = Path(__file__).parent / "fixtures" / "astronaut.png"
MODEL_FILES = ("manifest.json", "base.safetensors", "toon.safetensors", "encoder.safetensors")


def copy_models(folder: Path) -> Path:
    """The demo models without the directions and student they ship: each test makes what it needs."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copy(DEMO / name, folder / name)
    manifest = json.loads((folder / "manifest.json").read_text())
    for style in manifest["styles"].values():
        style.pop("directions", None)
        style.pop("students", None)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A models folder whose demo style has registered GANSpace directions with 'smile' named (coarse)."""
    folder = copy_models(tmp_path_factory.mktemp("models"))
    m = ["--models-dir", str(folder)]
    assert (
        main(["directions", "demo", "--method", "ganspace", "--register", "--top", "4", "--samples", "2000", *m]) == 0
    )
    assert main(["name-direction", "demo", "1", "smile", "--layers", "coarse", *m]) == 0
    return folder


@pytest.fixture(scope="module")
def demo_models(models):
    style = get_style("demo", models)
    base, toon = load_generator(style.base), load_generator(style.toon)
    return style, base, toon, blend(base, toon, style.blend)


def png_panel(path: Path, row: int, col: int, size: int = 64, pad: int = 2) -> np.ndarray:
    with Image.open(path) as im:
        return png_panel_of(im.convert("RGB"), row, col, size, pad)


def png_panel_of(grid: Image.Image, row: int, col: int, size: int = 64, pad: int = 2) -> np.ndarray:
    x, y = pad + col * (size + pad), pad + row * (size + pad)
    return np.asarray(grid.crop((x, y, x + size, y + size)), dtype=np.int16)


def same_pixels(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a level of rounding: a batch renders through other conv algorithms than a single face."""
    return a.shape == b.shape and int(np.abs(a - b).max()) <= 1


def test_directions_register_name_and_list(models, demo_models, tmp_path, capsys):
    _style, _base, toon, _blended = demo_models
    manifest = json.loads((models / "manifest.json").read_text())
    assert manifest["styles"]["demo"]["directions"] == "demo.directions.safetensors"
    ds = load_style_directions("demo", models, G=toon)  # made for the style's toon model
    assert ds.method == "ganspace" and len(ds) == 4 and ds.meta["style"] == "demo"
    assert ds.named["smile"].layers == layer_group(64, "coarse") and ds.named["smile"].index == 1

    # SeFa into a file of one's own, with a preview grid: rows = components, columns = strengths.
    out, preview = tmp_path / "sefa.safetensors", tmp_path / "grid.png"
    args = ["directions", "demo", "--method", "sefa", "--top", "3", "--layers", "middle", "--samples", "500"]
    assert main([*args, "--out", str(out), "--preview", str(preview), "--preview-strengths=-2,0,2",
                 "--models-dir", str(models)]) == 0  # fmt: skip
    sefa = load_directions(out, toon)
    assert sefa.method == "sefa" and len(sefa) == 3 and sefa.meta["layers"] == layer_group(64, "middle")
    with Image.open(preview) as im:
        assert im.size == (3 * 66 + 2, 3 * 66 + 2)
    assert same_pixels(png_panel(preview, 0, 1), png_panel(preview, 1, 1))  # strength 0: the unedited face in every row
    assert not same_pixels(png_panel(preview, 0, 0), png_panel(preview, 0, 2))

    # Naming by file and registering it for a style (in a models folder of this test's own); recomputing into
    # the registered file keeps the names.
    own = copy_models(tmp_path / "own")
    assert main(["name-direction", str(out), "0", "jaw", "--layers", "0-4", "--register", "demo",
                 "--models-dir", str(own)]) == 0  # fmt: skip
    assert json.loads((own / "manifest.json").read_text())["styles"]["demo"]["directions"] == str(out.resolve())
    assert load_style_directions("demo", own).named["jaw"].layers == [0, 1, 2, 3, 4]
    assert main(["directions", "demo", "--register", "--top", "2", "--samples", "500", "--models-dir", str(own)]) == 0
    recomputed = load_directions(out)
    assert recomputed.method == "ganspace" and len(recomputed) == 2 and recomputed.named["jaw"].method == "sefa"
    capsys.readouterr()
    assert main(["list-directions", str(out)]) == 0
    listing = capsys.readouterr().out
    assert "ganspace directions for generator 92149a315044" in listing
    assert "jaw: sefa component 0, W+ layers 0-4" in listing
    assert main(["list-directions", "--models-dir", str(models)]) == 0  # the default style
    assert "smile: ganspace component 1, W+ layers 0-2" in capsys.readouterr().out
    # A checkpoint instead of a style: directions for that generator.
    assert main(["directions", str(models / "base.safetensors"), "--top", "2", "--samples", "500",
                 "--out", str(tmp_path / "b.safetensors")]) == 0  # fmt: skip
    assert load_directions(tmp_path / "b.safetensors").generator_hash.startswith("72b75da1d5c5")


def test_edit_a_seeded_face(models, demo_models, tmp_path):
    _style, base, _toon, blended = demo_models
    out = tmp_path / "edit.png"
    m = ["--models-dir", str(models)]
    assert main(["edit", "--seed", "3", "--direction", "smile", "--strength", "2", "--out", str(out), *m]) == 0
    smile = load_style_directions("demo", models).named["smile"]
    expect = make_grid(render(blended, smile.apply(seed_latents(base, [3]), 2.0)), columns=1, pad=0)
    with Image.open(out) as im:
        assert im.size == (64, 64) and im.convert("RGB").tobytes() == expect.tobytes()
    # A component by index, with the layers overridden, and a negative strength.
    out2 = tmp_path / "edit2.png"
    args = ["edit", "--seed", "3", "--direction", "2", "--strength", "-1.5", "--layers", "fine", "--out", str(out2)]
    assert main([*args, "--style", "demo", *m]) == 0
    d = load_style_directions("demo", models).component(2, "fine")
    expect = make_grid(render(blended, d.apply(seed_latents(base, [3]), -1.5)), columns=1, pad=0)
    with Image.open(out2) as im:
        assert im.convert("RGB").tobytes() == expect.tobytes()


def test_edit_a_photo(models, tmp_path):
    photo = tmp_path / "astronaut.jpg"
    Image.open(FIXTURE).convert("RGB").save(photo, quality=92)
    m = ["--models-dir", str(models), "--steps", "2", "--min-face-size", "40"]
    outs = {}
    for strength in ("0", "3"):
        out = tmp_path / f"edit{strength}.png"
        args = [
            "edit",
            str(photo),
            "--direction",
            "smile",
            "--strength",
            strength,
            "--style",
            "demo",
            "--out",
            str(out),
        ]
        assert main([*args, *m]) == 0
        with Image.open(out) as im:
            assert im.size == Image.open(photo).size
        with Image.open(tmp_path / f"edit{strength}_toon0.png") as im:
            assert im.size == (64, 64)
            outs[strength] = im.convert("RGB").tobytes()
    assert outs["0"] != outs["3"]


def test_mix(models, demo_models, tmp_path):
    _style, base, _toon, blended = demo_models
    out = tmp_path / "mix.png"
    assert main(["mix", "--seeds", "1,2,3", "--layers", "coarse", "--out", str(out), "--models-dir", str(models)]) == 0
    with Image.open(out) as im:
        assert im.size == (3 * 66 + 2, 2 * 66 + 2)  # a row per donor: A, B, A with B's coarse layers
    ws = seed_latents(base, [1, 2, 3])
    for row, donor in enumerate((1, 2)):
        mixed = mix_styles(ws[:1], ws[donor : donor + 1], layer_group(64, "coarse"))
        expect = make_grid(render(blended, torch.cat([ws[:1], ws[donor : donor + 1], mixed])), columns=3)
        assert same_pixels(png_panel(out, row, 2), png_panel_of(expect, 0, 2))
    # A checkpoint instead of a style, and W+ indices instead of a group.
    out2 = tmp_path / "mix2.png"
    args = ["mix", "--seeds", "5,6", "--layers", "7-9", "--checkpoint", str(models / "base.safetensors")]
    assert main([*args, "--out", str(out2)]) == 0
    with Image.open(out2) as im:
        assert im.size == (3 * 66 + 2, 66 + 2)


def test_sweep(models, tmp_path):
    base, toon = str(models / "base.safetensors"), str(models / "toon.safetensors")
    out = tmp_path / "sweep.gif"
    assert main(["sweep", base, toon, "--out", str(out), "--seed", "2"]) == 0
    with Image.open(out) as im:
        assert im.format == "GIF" and im.n_frames == 5  # 4, 8, 16, 32 and 64 px
        im.seek(4)
        im.convert("RGB").load()
    webp = tmp_path / "sweep.webp"
    assert main(["sweep", base, toon, "--out", str(webp), "--structure-from", "base", "--duration-ms", "300"]) == 0
    with Image.open(webp) as im:
        assert im.format == "WEBP" and im.n_frames == 5
    sheet = tmp_path / "sweep.png"
    assert main(["sweep", base, toon, "--out", str(sheet)]) == 0
    with Image.open(sheet) as im:
        assert im.size == (5 * 64, 64 + 14)


def test_interpolate(models, demo_models, tmp_path):
    _style, base, _toon, blended = demo_models
    m = ["--models-dir", str(models)]
    gif = tmp_path / "walk.gif"
    assert main(["interpolate", "--seeds", "1,2,3", "--steps", "5", "--out", str(gif), *m]) == 0
    with Image.open(gif) as im:
        assert im.n_frames == 9  # 5 + 4: the middle stop is shown once
    grid = tmp_path / "walk.png"
    assert main(["interpolate", "--seeds", "1,2", "--steps", "4", "--style", "demo", "--out", str(grid), *m]) == 0
    with Image.open(grid) as im:
        assert im.size == (4 * 66 + 2, 66 + 2)
    ends = make_grid(render(blended, seed_latents(base, [1, 2])), columns=2)
    assert same_pixels(png_panel(grid, 0, 0), png_panel_of(ends, 0, 0))
    assert same_pixels(png_panel(grid, 0, 3), png_panel_of(ends, 0, 1))
    out = tmp_path / "walk.webp"
    assert (
        main(["interpolate", "--seeds", "4,5", "--checkpoint", str(models / "toon.safetensors"), "--out", str(out)])
        == 0
    )
    with Image.open(out) as im:
        assert im.n_frames == 8


def run_err(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["edit", "--seed", "1", "--direction", "frown", "--strength", "1", "--out", "{t}/x.png"],
         "unknown direction 'frown'; named directions: smile"),
        (["edit", "--seed", "1", "--direction", "9", "--strength", "1", "--out", "{t}/x.png"], "index 9 out of range"),
        (["edit", "--seed", "1", "--direction", "smile", "--strength", "1", "--layers", "eyes", "--out", "{t}/x.png"],
         "bad layers 'eyes'"),
        (["edit", "{t}/p.png", "--seed", "1", "--direction", "smile", "--strength", "1", "--out", "{t}/x.png"],
         "give a PHOTO or --seed N"),
        (["edit", "--direction", "smile", "--strength", "1", "--out", "{t}/x.png"], "give a PHOTO or --seed N"),
        (["edit", "--seed", "1", "--direction", "smile", "--strength", "1", "--out", "{t}/x.gif"], "write the image"),
        (["edit", "--seed", "1", "--direction", "smile", "--strength", "1", "--style", "nope", "--out", "{t}/x.png"],
         "unknown style 'nope'"),
        (["mix", "--seeds", "1,2", "--layers", "eyes", "--out", "{t}/m.png"], "bad layers 'eyes'"),
        (["mix", "--seeds", "1,2", "--layers", "0-12", "--out", "{t}/m.png"], "layer indices must lie in 0…9"),
        (["mix", "--seeds", "1", "--layers", "coarse", "--out", "{t}/m.png"], "needs two seeds or more"),
        (["interpolate", "--seeds", "1", "--out", "{t}/i.gif"], "needs two seeds or more"),
        (["interpolate", "--seeds", "1,2", "--steps", "1", "--out", "{t}/i.gif"], "--steps must be >= 2"),
        (["interpolate", "--seeds", "1,2", "--out", "{t}/i.mp4"], "not 'i.mp4'"),
        (["sweep", "{m}/base.safetensors", "{m}/toon.safetensors", "--out", "{t}/s.mp4"], "not 's.mp4'"),
        (["sweep", "{m}/base.safetensors", "{t}/none.safetensors", "--out", "{t}/s.gif"], "none.safetensors"),
        (["name-direction", "demo", "0", "3d"], "bad direction name '3d'"),
        (["name-direction", "demo", "0", "wide", "--layers", "fine,coarse"], "bad layers"),
        (["name-direction", "demo", "99", "wide"], "index 99 out of range"),
        (["name-direction", "{t}/none.safetensors", "0", "wide"], "no directions file"),
        (["directions", "demo"], "give --out FILE, or --register"),
        (["directions", "demo", "--out", "{t}/d.pt"], "written as .safetensors"),
        (["directions", "demo", "--top", "0", "--out", "{t}/d.safetensors"], "--top must be in 1…128"),
        (["directions", "{m}/base.safetensors", "--register"], "--register needs a style"),
        (["directions", "demo", "--out", "{t}/d.safetensors", "--preview-strengths", "a,b"], "bad strengths"),
        (["directions", "demo", "--out", "{t}/d.safetensors", "--preview", "{t}/g.gif"], "not 'g.gif'"),
        (["directions", "demo", "--method", "sefa", "--layers", "9", "--out", "{t}/d.safetensors"],
         "SeFa needs a style conv among --layers 9"),
        (["list-directions", "{t}/none.safetensors"], "unknown style"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_a_message(models, tmp_path, capsys, argv, message):
    argv = [a.format(t=tmp_path, m=models) for a in argv]
    Image.new("RGB", (32, 32)).save(tmp_path / "p.png")
    needs_models = argv[0] not in ("sweep",) and not (argv[0] == "list-directions" and "none" in argv[1])
    rc, err = run_err([*argv, *(["--models-dir", str(models)] if needs_models else [])], capsys)
    assert rc == 2, err
    assert err.startswith("toonify: error: ") and message in err, err


def test_directions_made_for_another_generator_are_refused(models, tmp_path, capsys):
    other = tmp_path / "base_dirs.safetensors"
    assert (
        main(["directions", str(models / "base.safetensors"), "--top", "2", "--samples", "300", "--out", str(other)])
        == 0
    )
    argv = ["edit", "--seed", "1", "--direction", "0", "--strength", "1", "--directions", str(other)]
    rc, err = run_err([*argv, "--out", str(tmp_path / "x.png"), "--models-dir", str(models)], capsys)
    assert rc == 2 and "made for generator 72b75da1d5c5, not 92149a315044" in err
    rc, err = run_err(
        ["name-direction", str(other), "0", "wide", "--register", "demo", "--models-dir", str(models)], capsys
    )
    assert rc == 2 and "made for generator 72b75da1d5c5" in err
    assert "wide" not in load_directions(other).named  # refused before anything was written


def test_a_style_without_directions(tmp_path, capsys):
    bare = copy_models(tmp_path / "bare")
    argv = ["edit", "--seed", "1", "--direction", "smile", "--strength", "1", "--out", str(tmp_path / "x.png")]
    rc, err = run_err([*argv, "--models-dir", str(bare)], capsys)
    assert rc == 2 and "style 'demo' has no directions yet; make them with `toonify directions demo --register`" in err
    rc, err = run_err(["name-direction", "demo", "0", "smile", "--models-dir", str(bare)], capsys)
    assert rc == 2 and "has no directions yet" in err


def test_argparse_refusals_exit_2(capsys):
    for argv in (["edit", "--seed", "1", "--direction", "smile", "--out", "x.png"],  # no --strength
                 ["directions", "demo", "--method", "ica"],
                 ["sweep", "a", "b", "--out", "s.gif", "--structure-from", "both"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
