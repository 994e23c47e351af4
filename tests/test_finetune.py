"""Community fine-tunes: safe ingestion, the fine-tune run (domain shift, frozen layers, snapshots, resume after
SIGKILL, cancellation), KID and the identity metric, and the ``toonify finetune`` command."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gan.checkpoints import content_hash, load_generator, read_checkpoint, save_generator
from gan.cli import main as cli_main
from gan.finetune import (
    DatasetRefusedError,
    FinetuneRun,
    FinetuneSettings,
    IdentityMeter,
    IngestLimits,
    ingest,
    kid,
    metrics_table,
    render,
    steps_for,
)
from gan.images import from_uint8
from gan.synthetic import make_dataset, save_dataset
from tests.conftest import make_tiny_discriminator, make_tiny_generator

ROOT = Path(__file__).resolve().parents[1]
RES = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: tiny models gain nothing from more, and the SIGKILL test compares this process's run
    bit for bit with a subprocess's (both single-threaded)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def toon_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("toons")
    save_dataset(d, 16, "toon", 64, seed=7)
    return d


@pytest.fixture(scope="module")
def toons(toon_dir):
    return ingest(toon_dir, RES)


@pytest.fixture(scope="module")
def base_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    return save_generator(make_tiny_generator(11, RES), path, D=make_tiny_discriminator(12, RES))


def settings(**kw) -> FinetuneSettings:
    """A tiny, fast recipe: 8-image batches, high learning rates, a short EMA, few metric samples."""
    base = dict(kimg=0.24, snapshot_kimg=0.08, batch=8, freeze_d=1, g_lr=0.01, d_lr=0.01, ema_kimg=0.05)
    return FinetuneSettings(**{**base, "metric_samples": 16, "identity_samples": 4, "preview_seeds": 4, **kw})


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def zip_bytes(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Ingestion


def test_ingest_keeps_aligns_dedupes_and_reports_why(tmp_path, toon_dir):
    d = tmp_path / "data"
    (d / "more").mkdir(parents=True)
    names = sorted(p.name for p in toon_dir.iterdir())[:9]
    for n in names:
        (d / n).write_bytes((toon_dir / n).read_bytes())
    (d / "more" / "extra.png").write_bytes((toon_dir / "toon_00015.png").read_bytes())
    (d / "zz_copy.png").write_bytes(png(np.asarray(Image.open(toon_dir / names[0]))))  # re-encoded, same pixels
    (d / "notes.txt").write_text("these are my toons")
    (d / "blank.png").write_bytes(png(np.full((60, 90, 3), 120, np.uint8)))  # no face: centre crop
    whole = (toon_dir / names[1]).read_bytes()
    (d / "cut.png").write_bytes(whole[: len(whole) // 2])
    (d / ".DS_Store").write_bytes(b"\0\1")

    ds = ingest(d, RES)
    r = ds.report
    assert ds.images.shape == (11, RES, RES, 3) and ds.images.dtype == np.uint8
    by = {e.name: e for e in r.entries}
    assert (by["zz_copy.png"].reason, by["zz_copy.png"].detail) == ("duplicate", f"same pixels as {names[0]}")
    assert by["notes.txt"].reason == "not_an_image" and by["cut.png"].reason == "truncated"
    assert by[".DS_Store"].reason == "hidden"
    assert (by["blank.png"].crop, by["blank.png"].detail) == ("centre", "no face found")
    assert (ds.images[[e.name for e in r.kept].index("blank.png")] == 120).all()
    faces = [e for e in r.kept if e.name != "blank.png"]
    assert sum(e.crop == "aligned" for e in faces) >= 8, [(e.name, e.crop) for e in faces]  # dlib reads toons
    assert r.counts()["kept"] == 11 and r.counts()["skipped_duplicate"] == 1
    assert "skipped 1 (not an image): notes.txt" in r.summary()
    assert len(ds.sha256) == 64 and json.dumps(r.to_json())

    # the same files as a zip give the same dataset, bit for bit
    files = {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
    assert ingest(zip_bytes(files), RES).sha256 == ds.sha256
    assert ingest(d, RES, align=False).report.counts()["aligned"] == 0


def test_a_zip_bomb_is_refused(toon_dir):
    toons = {p.name: p.read_bytes() for p in sorted(toon_dir.iterdir())[:8]}
    bomb = zip_bytes({**toons, "big.png": b"\0" * (30 << 20)})
    assert len(bomb) < 200_000
    with pytest.raises(DatasetRefusedError, match="zip bomb") as e:
        ingest(bomb, RES)
    assert "big.png" in e.value.report.refused
    with pytest.raises(DatasetRefusedError, match="zip bomb: the archive unpacks to"):
        ingest(zip_bytes(toons), RES, limits=IngestLimits(max_total_bytes=20_000))


@pytest.mark.parametrize("name", ["../evil.png", "faces/../../evil.png", "/etc/evil.png", "..\\evil.png", "C:/x.png"])
def test_a_path_traversal_entry_is_refused(toon_dir, name):
    files = {p.name: p.read_bytes() for p in sorted(toon_dir.iterdir())[:8]}
    with pytest.raises(DatasetRefusedError, match="path traversal") as e:
        ingest(zip_bytes({**files, name: files["toon_00000.png"]}), RES)
    assert e.value.report.refused.startswith("path traversal")


def test_a_folder_of_non_images_is_refused_with_a_report(tmp_path, base_path, capsys):
    d = tmp_path / "junk"
    d.mkdir()
    for i in range(4):
        (d / f"note{i}.txt").write_text("hello")
    (d / "paper.pdf").write_bytes(b"%PDF-1.4 not a picture")
    (d / "empty.jpg").write_bytes(b"")
    os.symlink("/etc/hostname", d / "link.png")
    with pytest.raises(DatasetRefusedError, match="0 usable images; at least 8 are needed") as e:
        ingest(d, RES)
    reasons = {x.name: x.reason for x in e.value.report.skipped}
    assert reasons == {**{f"note{i}.txt": "not_an_image" for i in range(4)}, "paper.pdf": "not_an_image",
                       "empty.jpg": "empty", "link.png": "not_a_file"}  # fmt: skip
    assert cli_main(["finetune", str(base_path), str(d), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "refused: 0 usable images" in err and "note0.txt" in err and "paper.pdf" in err
    assert not (tmp_path / "run" / "snapshot.pt").exists()


# ----------------------------------------------------------------------------------------------------------
# Metrics


def test_kid_is_about_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    same, shifted = kid(a, b), kid(a, b + 0.5)
    assert abs(same) < 0.02 and shifted > 10 * max(abs(same), 1e-3)
    assert kid(a, b + 1.0) > shifted
    with pytest.raises(ValueError):
        kid(a[:1], b)


def test_identity_meter_reads_synthetic_faces_and_reports_none_it_cannot():
    meter = IdentityMeter()
    faces = make_dataset(2, "photo", 64, seed=3)
    blank = np.full((64, 64, 3), 128, np.uint8)
    d = meter.descriptors(np.stack([faces[0], faces[0], faces[1], blank]))
    assert d[3] is None and all(x is not None for x in d[:3])
    row = meter.compare(d[:3], [d[1], d[2], None])
    assert row["readable"] == 2 and row["of"] == 3
    assert np.linalg.norm(d[0] - d[1]) == 0 and np.linalg.norm(d[0] - d[2]) > 0.1
    assert meter.compare([None, None], [None, None])["note"] == "no readable faces"


# ----------------------------------------------------------------------------------------------------------
# Runs


def colour_stats(images: torch.Tensor) -> np.ndarray:
    """Mean brightness, fraction of near-black pixels (toon ink) and mean colour: the toon domain's palette."""
    a = images.clamp(-1, 1) * 0.5 + 0.5
    return np.array([a.mean().item(), (a.amax(1) < 0.2).float().mean().item(), *a.mean([0, 2, 3]).tolist()])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, base_path, toons):
    """One complete tiny run (3 snapshots), shared by the tests that read its files. No Inception weights."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TOONIFY_INCEPTION_PATH", raising=False)
        return FinetuneRun(tmp_path_factory.mktemp("finished") / "run", base_path, toons, settings()).run()


def test_finetune_moves_samples_toward_the_toon_domain_with_lineage_and_report(finished, base_path, toons):
    result, tmp_path = finished, finished.out_dir.parent
    assert result.status == "done" and result.steps == 30 == steps_for(0.24, 8)

    z = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    target = colour_stats(from_uint8(toons.images))
    before = colour_stats(render(load_generator(base_path), z))
    after = colour_stats(render(load_generator(result.checkpoint), z))
    assert np.abs(after - target).sum() < 0.4 * np.abs(before - target).sum(), (target, before, after)
    kids = [row["kid"] for row in result.metrics]
    assert [row["step"] for row in result.metrics] == [0, 10, 20, 30]
    assert kids[-1] < 0.1 * kids[0], kids  # KID on the base D's features falls as samples become toons

    meta = read_checkpoint(result.checkpoint).meta
    base_hash = content_hash(load_generator(base_path).state_dict())
    assert meta["ancestors"] == [base_hash] and meta["base"]["content_hash"] == base_hash
    assert meta["training"]["dataset"]["sha256"] == toons.sha256 and meta["finetune"]["freeze_d"] == 1
    assert meta["metrics"] == json.loads(json.dumps(result.metrics))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["metrics"][-1]["kid_features"].startswith("base discriminator")
    assert report["metrics"][-1]["inception"].startswith("not available")
    assert report["metrics"][-1]["identity"]["note"].startswith("no readable faces")  # random tiny base
    for r in (8, 16):
        assert (tmp_path / "run" / report["blend_previews"][str(r)]).is_file()
    assert all((tmp_path / "run" / row["preview"]).is_file() for row in result.metrics)
    head = metrics_table(result.metrics).splitlines()[0]
    assert "KID(D)" in head and "FID" not in head  # no FID column without Inception weights


def test_every_snapshot_is_a_loadable_generator_with_lineage(finished, base_path):
    run_dir, rows = finished.out_dir, finished.metrics
    names = sorted(p.name for p in (run_dir / "snapshots").iterdir())
    assert names == ["kimg000000.080.safetensors", "kimg000000.160.safetensors", "kimg000000.240.safetensors"]
    assert "generator" not in rows[0]  # the first row is the base model itself, not a snapshot
    assert [row["generator"] for row in rows[1:]] == [f"snapshots/{n}" for n in names]
    base_hash = content_hash(load_generator(base_path).state_dict())
    hashes = []
    for row in rows[1:]:
        G = load_generator(run_dir / row["generator"])
        meta = G.meta
        assert meta["ancestors"] == [base_hash] and meta["base"]["content_hash"] == base_hash
        assert meta["snapshot"] == {"kimg": row["kimg"], "step": row["step"], "metrics": row}
        assert meta["training"]["steps"] == row["step"] and meta["metrics"][-1] == row
        assert read_checkpoint(run_dir / row["generator"]).discriminator_state is None  # generators only
        img = render(G, torch.randn(2, G.z_dim, generator=torch.Generator().manual_seed(0)))
        assert img.shape == (2, 3, RES, RES) and torch.isfinite(img).all()
        hashes.append(meta["content_hash"])
    assert len(set(hashes)) == 3  # training moved the weights between snapshots
    final = load_generator(finished.checkpoint)
    assert hashes[-1] == final.meta["content_hash"]  # the last snapshot is the toon model
    assert torch.equal(load_generator(run_dir / rows[-1]["generator"]).w_avg, final.w_avg)


def test_a_blend_of_a_snapshot_and_the_final_model_loads_and_renders(finished, base_path, tmp_path, capsys):
    import warnings

    from gan.blending import LineageWarning

    run_dir = finished.out_dir
    first, final = run_dir / finished.metrics[1]["generator"], finished.checkpoint
    z = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LineageWarning)  # snapshots share the base: no warning
        out = tmp_path / "snap_final.safetensors"
        assert cli_main(["blend", str(first), str(final), "--swap", "8", "--out", str(out)]) == 0
        G = load_generator(out)
        assert set(G.meta["parents"].values()) == {load_generator(p).meta["content_hash"] for p in (first, final)}
        img = render(G, z)
        assert img.shape == (3, 3, RES, RES) and torch.isfinite(img).all()
        assert not torch.equal(img, render(load_generator(final), z))

        three = tmp_path / "three.safetensors"  # base for the fine layers, the snapshot's 4-8 px, the final 16 px
        args = ["blend", str(base_path), str(first), str(final), "--shares", "1,1,1,1,0,0,0,0"]
        assert cli_main([*args, "--shares", "0,0,0,0,1,1,0,0", "--out", str(three)]) == 0
        G3 = load_generator(three)
        assert G3.meta["blend_many"]["shares"][0] == [0, 0, 0, 0, 0, 0, 1, 1]
        assert torch.isfinite(render(G3, z)).all()
    assert "3 models" in capsys.readouterr().err


def test_fid_beside_kid_where_inception_weights_are_configured(tmp_path, base_path, toons, monkeypatch):
    from gan.inception import FIDInception

    weights = tmp_path / "pt_inception-random.pth"
    torch.save(FIDInception().state_dict(), weights)  # random weights of the right layout: the wiring, not values
    monkeypatch.setenv("TOONIFY_INCEPTION_PATH", str(weights))
    tiny = settings(kimg=0.016, snapshot_kimg=0.016, metric_samples=4)
    result = FinetuneRun(tmp_path / "run", base_path, toons, tiny, identity=False).run()
    assert [row["step"] for row in result.metrics] == [0, 2]
    for row in result.metrics:
        assert row["fid"] > 0 and np.isfinite(row["kid_inception"]) and row["kid"] is not None
        assert row["inception"].startswith("Inception-v3") and weights.name in row["inception"]
    assert result.metrics[0]["fid"] != result.metrics[1]["fid"]
    table = metrics_table(result.metrics)
    head = table.splitlines()[0]
    assert "FID" in head and "KID(I)" in head and "Inception: not available" not in table

    monkeypatch.setenv("TOONIFY_INCEPTION_PATH", str(tmp_path / "absent.pth"))
    with pytest.raises(FileNotFoundError, match=r"absent\.pth"):  # configured but missing: an error, not a fallback
        FinetuneRun(tmp_path / "run2", base_path, toons, tiny, identity=False)


def test_frozen_layers_are_bit_identical_after_a_finetune(tmp_path, base_path, toons):
    result = FinetuneRun(tmp_path / "run", base_path, toons, settings(kimg=0.048, freeze_d=2, freeze_g=1)).run()
    base, toon = read_checkpoint(base_path), read_checkpoint(result.checkpoint)
    top = ("convs.4.", "convs.5.", "to_rgbs.2.")  # the 32 px block: all FreezeG=1 trains
    g_base, g_toon = base.generator_state, toon.generator_state
    for k, _ in load_generator(base_path).named_parameters():  # parameters: buffers never train
        assert torch.equal(g_base[k], g_toon[k]) != k.startswith(top), k
    frozen = ("convs.0.", "convs.1.", "convs.2.")  # fromRGB and the first two D blocks
    d_base, d_toon = base.discriminator_state, toon.discriminator_state
    for k in d_base:
        if not k.endswith(".kernel"):  # the fixed blur kernels are buffers
            assert torch.equal(d_base[k], d_toon[k]) == k.startswith(frozen), k


def _cli(base: Path, data: Path, out: Path, *extra: str) -> subprocess.Popen:
    args = ["--kimg", "0.32", "--snapshot-kimg", "0.064", "--batch", "8", "--freeze-d", "1", "--aug", "ada"]
    args += ["--metric-samples", "8", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gan.cli", "finetune", str(base), str(data), "--out", str(out), *args, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_a_run_killed_after_a_snapshot_resumes_to_the_uninterrupted_result(tmp_path, base_path, toon_dir, toons):
    out = tmp_path / "killed"
    proc = _cli(base_path, toon_dir, out)
    try:
        deadline = time.monotonic() + 60
        while not (out / "snapshot.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no snapshot within 60 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    at_kill = torch.load(out / "snapshot.pt", weights_only=True)["step"]
    assert 8 <= at_kill < 40 and not (out / "toon.safetensors").exists()

    resumed = _cli(base_path, toon_dir, out, "--resume")
    # meanwhile, the same run uninterrupted, in this process
    straight_settings = FinetuneSettings(
        kimg=0.32, snapshot_kimg=0.064, batch=8, freeze_d=1, aug="ada", metric_samples=8, seed=3
    )
    straight = FinetuneRun(tmp_path / "straight", base_path, toons, straight_settings).run()
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err.decode()[-2000:]

    a, b = read_checkpoint(straight.checkpoint), read_checkpoint(out / "toon.safetensors")
    for state_a, state_b in ((a.generator_state, b.generator_state), (a.discriminator_state, b.discriminator_state)):
        assert state_a.keys() == state_b.keys()
        for k in state_a:
            assert torch.equal(state_a[k], state_b[k]), k
    assert a.meta["metrics"] == b.meta["metrics"]  # the same metrics table, the kill left no trace
    assert a.meta["training"]["aug_p"] == b.meta["training"]["aug_p"]
    snaps = sorted(p.name for p in (straight.out_dir / "snapshots").iterdir())
    assert len(snaps) == 5 and sorted(p.name for p in (out / "snapshots").iterdir()) == snaps
    for name in snaps:  # every snapshot generator too, those written before the kill included
        sa, sb = read_checkpoint(straight.out_dir / "snapshots" / name), read_checkpoint(out / "snapshots" / name)
        assert sa.meta["content_hash"] == sb.meta["content_hash"] and sa.meta["snapshot"] == sb.meta["snapshot"]


def test_cancel_keeps_a_snapshot_and_a_resume_finishes(tmp_path, base_path, toons):
    s = settings(kimg=0.096, snapshot_kimg=0.064)
    run = FinetuneRun(tmp_path / "run", base_path, toons, s, identity=False)
    seen = []
    stopped = run.run(progress=lambda stage, i, n: seen.append(i), should_cancel=lambda: len(seen) >= 5)
    assert stopped.status == "cancelled" and stopped.checkpoint is None and stopped.steps == 5
    assert torch.load(tmp_path / "run" / "snapshot.pt", weights_only=True)["step"] == 5

    with pytest.raises(ValueError, match="already holds a run"):
        FinetuneRun(tmp_path / "run", base_path, toons, s)
    with pytest.raises(ValueError, match="other settings"):
        FinetuneRun(tmp_path / "run", base_path, toons, replace(s, freeze_d=2), resume=True)
    other = ingest(zip_bytes({f"{i}.png": png(img) for i, img in enumerate(make_dataset(8, "toon", RES, 9))}), RES)
    with pytest.raises(ValueError, match="other data"):
        FinetuneRun(tmp_path / "run", base_path, other, s, resume=True)

    done = FinetuneRun(tmp_path / "run", base_path, toons, s, resume=True, identity=False).run()
    assert done.status == "done" and done.steps == 12 and done.checkpoint.is_file()
    assert [row["step"] for row in done.metrics] == [0, 8, 12]


def test_bases_in_every_format_with_a_discriminator_fine_tune_and_share_lineage(tmp_path, base_path, toons):
    from gan.checkpoints import CheckpointError, generator_to_data, write_checkpoint
    from tests.nv_pickles import write_nv_pytorch_pickle

    G, D = load_generator(base_path), make_tiny_discriminator(12, RES)
    bases = {
        "rosinality": write_checkpoint(generator_to_data(G, D=D), tmp_path / "base.pt"),
        "nvidia": write_nv_pytorch_pickle(tmp_path / "base.pkl", G, D),
    }
    tiny = settings(kimg=0.016, snapshot_kimg=0.016, metric_samples=4)
    for name, path in bases.items():
        result = FinetuneRun(tmp_path / name, path, toons, tiny, identity=False).run()
        assert read_checkpoint(result.checkpoint).meta["ancestors"] == [content_hash(G.state_dict())], name
    no_d = save_generator(G, tmp_path / "no_d.safetensors")
    with pytest.raises(CheckpointError, match="needs the base model's discriminator"):
        FinetuneRun(tmp_path / "x", no_d, toons, tiny)


def test_bench_compare_quick_runs_six_recipes_over_three_seeds_with_spread(tmp_path):
    out = tmp_path / "compare.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("TOONIFY_INCEPTION_PATH", None)
    cmd = [sys.executable, "bench/finetune.py", "--compare", "--quick", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    labels = ["baseline", "FreezeD", "DiffAugment (p = 1)", "ADA", "FreezeD + DiffAugment", "FreezeD + ADA"]
    assert [r["label"] for r in result["summary"]] == labels and result["seeds"] == [0, 1, 2]
    assert len(result["runs"]) == 18 and result["inception"] is None
    for row in result["summary"]:
        runs = [r for r in result["runs"] if r["recipe"] == row["recipe"]]
        assert row["n"] == 3 and sorted(r["seed"] for r in runs) == [0, 1, 2]
        for key in ("kid_train", "kid_heldout"):
            values = [r[key] for r in runs]
            stat = row[key]
            assert stat["min"] == min(values) and stat["max"] == max(values)
            assert stat["mean"] == pytest.approx(np.mean(values))
            assert stat["sd"] == pytest.approx(np.std(values, ddof=1))
        assert "fid_heldout" not in row
    assert (result["summary"][2]["aug_p"], result["summary"][0]["aug_p"]) == (1.0, None)  # DiffAugment p = 1
    for label in labels:
        assert f"| {label} (n=3) |" in proc.stdout
    assert "FID: no Inception weights configured" in proc.stdout
