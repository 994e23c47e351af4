"""``toonify styles`` and the manifest schema: checkpoints of any format become a listed style; bad manifests
are refused naming the field; the pair check tells fine-tunes from unrelated models."""

from __future__ import annotations

import json
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from gan.checkpoints import load_generator, read_checkpoint, save_generator
from gan.cli import main
from gan.encoder import load_encoder
from gan.model_admin import SHARED_BASE_MAX, pair_check, swap_resolutions
from gan.networks import Discriminator, Generator, GeneratorConfig
from gan.styles import DEMO_DIR, Manifest, ManifestError, read_manifest, update_manifest
from tests.nv_pickles import write_nv_pytorch_pickle
from tests.test_checkpoints import _Exploit

ROOT = Path(__file__).resolve().parents[1]
SMALL = GeneratorConfig(resolution=32, z_dim=32, w_dim=32, n_mlp=2, channels={4: 32, 8: 32, 16: 16, 32: 16})


def fine_tune_of(G: Generator, seed: int, amount: float = 0.05) -> Generator:
    """A copy of ``G`` whose synthesis weights moved a little, as a short fine-tune moves them."""
    torch.manual_seed(seed)
    T = Generator(G.config)
    with torch.no_grad():
        T.load_state_dict(G.state_dict())
        for name, p in T.named_parameters():
            if not name.startswith("style"):
                p.add_(amount * p.abs().mean() * torch.randn_like(p))
    T.compute_w_avg(n=256)
    return T


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A base as an NVIDIA stylegan2-ada-pytorch pickle, its fine-tune as a rosinality .pt, an unrelated .pt."""
    d = tmp_path_factory.mktemp("small")
    torch.manual_seed(11)
    base = Generator(SMALL)
    base.compute_w_avg(n=256)
    write_nv_pytorch_pickle(d / "base.pkl", base, Discriminator(resolution=32, channels=dict(SMALL.channels)))
    save_generator(fine_tune_of(base, 12), d / "toon.pt")
    torch.manual_seed(13)
    other = Generator(SMALL)
    other.compute_w_avg(n=256)
    save_generator(other, d / "other.pt")
    return d / "base.pkl", d / "toon.pt", d / "other.pt"


@pytest.fixture(scope="module")
def config_f_downloads(tmp_path_factory) -> tuple[Path, Path]:
    """What an operator downloads: a config-f 256 px base (.pkl, NVIDIA's layout) and its toon (.pt, rosinality's)."""
    d = tmp_path_factory.mktemp("downloads")
    torch.manual_seed(2026)
    base = Generator(GeneratorConfig(resolution=256))  # config-f: 512 channels up to 64 px, then 256, 128
    base.compute_w_avg(n=1024)
    write_nv_pytorch_pickle(d / "ffhq-256-config-f.pkl", base)
    save_generator(fine_tune_of(base, 2027), d / "toon-256.pt")
    return d / "ffhq-256-config-f.pkl", d / "toon-256.pt"


def add(models: Path, name: str, base: Path, toon: Path, *extra: str) -> int:
    return main(["styles", "add", name, "--base", str(base), "--toon", str(toon), "--models-dir", str(models), *extra])


# ------------------------------------------------------------------------------------------------ the schema


def write_manifest(folder: Path, data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return folder


GOOD = {"base": "b.safetensors", "default_style": "disney", "styles": {"disney": {"toon": "t.safetensors"}}}


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({**GOOD, "styles": {"disney": {"toon": "t", "blend": {"mode": "swap", "resolution": 33}}}},
         "styles.disney.blend.resolution", "power of two"),
        ({**GOOD, "styles": {"disney": {"toon": "t", "blend": {"mode": "swop", "resolution": 16}}}},
         "styles.disney.blend.mode", "'swap'"),
        ({**GOOD, "styles": {"disney": {"toon": "t", "blend": {"mode": "smooth", "resolution": 16}}}},
         "styles.disney.blend.width", "finite width"),
        ({**GOOD, "styles": {"disney": {"blend": {"mode": "swap", "resolution": 16}}}}, "styles.disney.toon",
         "required"),
        ({**GOOD, "styles": {"disney": {"toon": 7}}}, "styles.disney.toon", "non-empty string"),
        ({"styles": {"disney": {"toon": "t"}}}, "styles.disney.base", "required"),
        ({**GOOD, "default_style": "pixar"}, "default_style", "'pixar'"),
        ({**GOOD, "styles": {"Disney Classic": {"toon": "t"}}}, "styles.Disney Classic", "a-z"),
        ({**GOOD, "styles": {"disney": {"toon": "t", "students": [{"file": "s.safetensors"}]}}},
         "styles.disney.students[0].blend", "required"),
        ({**GOOD, "styles": {"disney": {"toon": "t", "students": {"file": "s"}}}}, "styles.disney.students", "list"),
        ({**GOOD, "schema_version": 99}, "schema_version", "newer"),
        ({**GOOD, "schema_version": "1"}, "schema_version", "whole number"),
        ({**GOOD, "styles": []}, "styles", "object"),
        ([GOOD], "(top level)", "object"),
        ('{"base": "b", "styles": {', "line 1 column", "not valid JSON"),
    ],
)  # fmt: skip
def test_a_bad_manifest_is_refused_naming_the_field(tmp_path, capsys, data, field, words):
    folder = write_manifest(tmp_path / "m", data)
    with pytest.raises(ManifestError) as e:
        read_manifest(folder)
    assert e.value.field.startswith(field) and words in str(e.value)
    # Every command that reads the folder says the same in one line, without a traceback.
    assert main(["styles", "list", "--models-dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f": {field}" in err and words in err and "Traceback" not in err


def test_version_one_files_without_the_field_still_load_and_writers_stamp_it(tmp_path):
    folder = write_manifest(tmp_path / "m", GOOD)
    m = read_manifest(folder)
    assert m.schema_version == 1 and m.style().name == "disney" and m.style().base == folder / "b.safetensors"
    update_manifest(folder, lambda d: d.update(note="hello"))
    assert json.loads((folder / "manifest.json").read_text())["schema_version"] == 1


def test_a_change_that_breaks_the_manifest_writes_nothing(tmp_path):
    folder = write_manifest(tmp_path / "m", GOOD)
    before = (folder / "manifest.json").read_bytes()
    with pytest.raises(ManifestError, match=r"styles\.disney\.blend\.resolution"):
        update_manifest(folder, lambda d: d["styles"]["disney"].update(blend={"mode": "swap", "resolution": 3}))
    assert (folder / "manifest.json").read_bytes() == before
    assert not list(folder.glob("*.tmp"))


def test_the_top_level_encoder_serves_only_its_own_base(tmp_path):
    styles = {"same": {"toon": "t1"}, "own": {"toon": "t2", "base": "b2"},
              "explicit": {"toon": "t3", "base": "b2", "encoder": "e2"}}  # fmt: skip
    data = {"base": "b", "encoder": "e", "styles": styles}
    m = Manifest.from_json(data, tmp_path)
    assert m.styles["same"].encoder == tmp_path / "e"
    assert m.styles["own"].encoder is None and m.styles["own"].base == tmp_path / "b2"
    assert m.styles["explicit"].encoder == tmp_path / "e2"


def test_the_bundled_manifest_fits_the_schema():
    m = read_manifest(DEMO_DIR)
    assert m.default_style == "demo" and m.styles["demo"].students and m.styles["demo"].directions


# --------------------------------------------------------------------------------------------- pair check


def test_pair_check_tells_a_fine_tune_from_an_unrelated_model(small_pair):
    base, toon, other = (load_generator(p) for p in small_pair)
    base.meta, toon.meta, other.meta = {}, {}, {}  # no recorded lineage: the weights must tell
    tuned = pair_check(base, toon)
    assert tuned.shares_base and tuned.by == "weights" and tuned.median_relative < SHARED_BASE_MAX
    assert [d.resolution for d in tuned.layers] == [4, 4, 8, 8, 16, 16, 32, 32]
    unrelated = pair_check(base, other)
    assert not unrelated.shares_base and unrelated.median_relative > 1.0  # independent weights: about sqrt(2)
    assert "does not look fine-tuned" in unrelated.describe() and "|toon-base|/|base|" in unrelated.table()


def test_pair_check_trusts_recorded_lineage_and_the_demo_weights_agree():
    base, toon = load_generator(DEMO_DIR / "base.safetensors"), load_generator(DEMO_DIR / "toon.safetensors")
    check = pair_check(base, toon)
    assert check.shares_base and check.by == "lineage"
    base.meta, toon.meta = {}, {}  # a real fine-tune (the demo's, 16 kimg) told by its weights alone
    check = pair_check(base, toon)
    assert check.shares_base and check.by == "weights" and check.median_relative < SHARED_BASE_MAX / 2


# ------------------------------------------------------------------------------------------- styles add …


def test_styles_add_converts_checks_previews_and_lists(small_pair, tmp_path, capsys):
    base_pkl, toon_pt, _ = small_pair
    models = tmp_path / "models"
    assert add(models, "sketch", base_pkl, toon_pt, "--blend", "8", "--preview-seeds", "1,2,3") == 0
    out = capsys.readouterr()
    assert "descends from this base (median per-layer weight distance" in out.err
    m = read_manifest(models)
    st = m.styles["sketch"]
    assert m.default_style == "sketch" and m.base == st.base  # a new folder: its first base is the folder's
    assert st.blend.resolution == 8 and st.encoder is None
    # Converted to our format with the same weights, the inferred ancestry recorded in the toon file.
    assert read_checkpoint(st.base).source_format == "native" and read_checkpoint(st.toon).source_format == "native"
    base, toon = load_generator(st.base), load_generator(st.toon)
    assert base.meta["content_hash"] == load_generator(base_pkl).meta["content_hash"]
    assert toon.meta["content_hash"] == load_generator(toon_pt).meta["content_hash"]
    assert base.meta["content_hash"] in toon.meta["ancestors"] and "inferred" in toon.meta["ancestry"]
    assert st.raw["pair_check"]["shares_base"] and st.raw["pair_check"]["by"] == "weights"
    # The preview: 3 seeds x (base, swaps 8 and 16, toon) at 32 px with 2 px padding.
    sheet = Image.open(models / st.raw["preview"])
    columns = 2 + len(swap_resolutions(32))
    assert sheet.size == (columns * 34 + 2, 3 * 34 + 2)

    assert add(models, "sketch", base_pkl, toon_pt) == 2
    assert "already in" in capsys.readouterr().err
    assert add(models, "sketch", base_pkl, toon_pt, "--replace", "--no-preview") == 0


def test_styles_on_one_base_share_its_file_and_encoder(small_pair, tmp_path, capsys):
    base_pkl, toon_pt, other_pt = small_pair
    models = tmp_path / "models"
    assert add(models, "one", base_pkl, toon_pt, "--no-preview") == 0
    assert add(models, "two", base_pkl, toon_pt, "--no-preview", "--default") == 0
    m = read_manifest(models)
    assert m.styles["one"].base == m.styles["two"].base and len(list(models.glob("base-*.safetensors"))) == 1
    assert m.default_style == "two"

    # Removing one keeps the shared base; --delete-files takes only what nobody else names.
    assert main(["styles", "remove", "two", "--models-dir", str(models), "--delete-files"]) == 0
    m = read_manifest(models)
    assert set(m.styles) == {"one"} and m.default_style == "one" and m.styles["one"].base.exists()
    assert not (models / "two.toon.safetensors").exists() and (models / "one.toon.safetensors").exists()

    # An unrelated toon is added with the evidence printed (an operator may know better), and recorded.
    assert add(models, "odd", base_pkl, other_pt, "--no-preview") == 0
    err = capsys.readouterr().err
    assert "does not look fine-tuned" in err and "position" in err
    assert read_manifest(models).styles["odd"].raw["pair_check"]["shares_base"] is False

    assert main(["styles", "set-default", "odd", "--models-dir", str(models)]) == 0
    assert read_manifest(models).default_style == "odd"
    assert main(["styles", "set-default", "nope", "--models-dir", str(models)]) == 2


def test_styles_add_reuses_the_demo_base_and_its_encoder(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(DEMO_DIR, models)
    toon = fine_tune_of(load_generator(models / "base.safetensors"), 3)
    toon.meta = {}
    save_generator(toon, tmp_path / "mine.pt")
    assert add(models, "mine", models / "base.safetensors", tmp_path / "mine.pt", "--no-preview") == 0
    m = read_manifest(models)
    st = m.styles["mine"]
    assert st.base == models / "base.safetensors"  # the same weights: no second copy
    assert st.encoder == models / "encoder.safetensors"  # and the encoder trained for them
    assert m.default_style == "demo"  # the folder already had one


def test_styles_add_can_train_the_encoder_and_fast_mode_then_works(small_pair, tmp_path, capsys):
    base_pkl, toon_pt, _ = small_pair
    models = tmp_path / "models"
    assert add(models, "sketch", base_pkl, toon_pt, "--no-preview", "--train-encoder", "--encoder-steps", "3") == 0
    assert "trained and listed the encoder" in capsys.readouterr().err
    m = read_manifest(models)
    st = m.styles["sketch"]
    assert st.encoder is not None and st.encoder.exists() and m.encoder == st.encoder  # the folder's base too
    assert not list(models.glob("*.snapshot"))
    base = load_generator(st.base)
    load_encoder(st.encoder, base)  # tied to this base's weights (refuses any other)
    # A second style on the same base finds that encoder without training again.
    assert add(models, "other", base_pkl, toon_pt, "--no-preview") == 0
    assert read_manifest(models).styles["other"].encoder == st.encoder


def test_styles_add_refuses_what_cannot_work(small_pair, tmp_path, capsys, monkeypatch):
    base_pkl, toon_pt, _ = small_pair
    models = tmp_path / "models"
    monkeypatch.delenv("TOONIFY_MODELS_DIR", raising=False)
    # Different architectures cannot be blended.
    assert add(models, "x", DEMO_DIR / "base.safetensors", toon_pt) == 2
    assert "cannot be blended" in capsys.readouterr().err
    # An encoder trained for another base.
    assert add(models, "x", base_pkl, toon_pt, "--encoder", str(DEMO_DIR / "encoder.safetensors")) == 2
    assert "was trained for generator" in capsys.readouterr().err
    # A name /style could not type, a blend finer than the model, a file that is not a checkpoint.
    assert add(models, "Sketch Book", base_pkl, toon_pt) == 2
    assert "a-z" in capsys.readouterr().err
    assert add(models, "x", base_pkl, toon_pt, "--blend", "64") == 2
    assert "only 32px" in capsys.readouterr().err
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"not a checkpoint at all")
    assert add(models, "x", junk, toon_pt) == 2
    assert "base checkpoint" in capsys.readouterr().err
    marker = tmp_path / "pwned"  # a pickle that would run a command if anything ever called its reduce
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"G_ema": _Exploit(marker)}, protocol=4))
    assert add(models, "x", base_pkl, tmp_path / "evil.pkl") == 2
    assert "toon checkpoint" in capsys.readouterr().err and not marker.exists()
    assert not models.exists()  # nothing was written, let alone listed
    # Nowhere to write: no --models-dir and no TOONIFY_MODELS_DIR (the bundled demo is not for new styles).
    assert main(["styles", "add", "x", "--base", str(base_pkl), "--toon", str(toon_pt)]) == 2
    assert "--models-dir" in capsys.readouterr().err
    assert add(DEMO_DIR, "x", base_pkl, toon_pt) == 2


def test_styles_list_and_show_report_modes_and_missing_files(tmp_path, capsys):
    models = tmp_path / "models"
    shutil.copytree(DEMO_DIR, models)
    (models / "encoder.safetensors").unlink()
    assert main(["styles", "list", "--models-dir", str(models)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "demo" in x)
    assert line.startswith("*") and "64px" in line and "MISSING encoder" in line
    assert main(["styles", "show", "demo", "--models-dir", str(models), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["files"]["encoder"]["exists"] is False and report["files"]["toon"]["exists"] is True
    assert report["modes"][0] == "instant" and report["resolution"] == 64


# ------------------------------------------------------------------------------- processes and signals


def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bots.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)  # fmt: skip


def test_a_styles_add_killed_midway_lists_nothing_and_can_be_run_again(config_f_downloads, tmp_path):
    base_pkl, toon_pt = config_f_downloads
    models = tmp_path / "models"
    shutil.copytree(DEMO_DIR, models)
    before = (models / "manifest.json").read_bytes()
    args = ("styles", "add", "cartoon", "--base", str(base_pkl), "--toon", str(toon_pt), "--models-dir", str(models))
    proc = cli(*args)
    deadline = time.monotonic() + 300
    while not list(models.glob("base-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # until it has begun writing converted checkpoints (the toon and the preview follow)
    assert proc.poll() is None, "styles add ended before it was caught writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    # Nothing is listed, and every file under its real name is whole (writers go through a .tmp and rename).
    assert (models / "manifest.json").read_bytes() == before
    written = [f for f in models.glob("*.safetensors") if f.name.startswith(("base-", "cartoon."))]
    for f in written:
        assert load_generator(f).resolution == 256
    again = cli(*args, "--no-preview")
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert read_manifest(models).styles["cartoon"].base.exists()


def test_two_processes_adding_at_once_both_get_listed(small_pair, tmp_path):
    base_pkl, toon_pt, other_pt = small_pair
    models = tmp_path / "models"
    procs = [cli("styles", "add", name, "--base", str(base_pkl), "--toon", str(toon), "--models-dir", str(models),
                 "--no-preview") for name, toon in (("one", toon_pt), ("two", other_pt))]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert set(read_manifest(models).styles) == {"one", "two"}


def test_a_toon_listed_twice_is_found_by_the_style_name(tmp_path):
    styles = {"a": {"toon": "t", "encoder": "e"}, "b": {"toon": "t", "encoder": None}, "c": {"toon": "u"}}
    m = Manifest.from_json({"base": "b0", "styles": styles}, tmp_path)
    assert m.style_for_toon(tmp_path / "t", "b").encoder is None
    assert m.style_for_toon(tmp_path / "t", "a").encoder == tmp_path / "e"
    assert m.style_for_toon(tmp_path / "t").name == "a"  # no name: the first listed
    assert m.style_for_toon(tmp_path / "x") is None  # a community fine-tune: not in the manifest


def test_fast_mode_on_a_style_without_encoder_is_refused_with_the_way_out(small_pair, tmp_path, capsys, monkeypatch):
    base_pkl, toon_pt, _ = small_pair
    models = tmp_path / "models"
    assert add(models, "sketch", base_pkl, toon_pt, "--no-preview") == 0
    monkeypatch.setenv("TOONIFY_MODELS_DIR", str(models))
    photo = ROOT / "tests" / "fixtures" / "astronaut.png"
    assert main(["toon", str(photo), "--style", "sketch", "--mode", "fast", "--out", str(tmp_path / "t.png")]) == 2
    assert "fast mode needs an encoder" in capsys.readouterr().err
    assert not (tmp_path / "t.png").exists()
