"""bench/distill.py: the quick run goes end to end on CPU with a given student, and its JSON has every row
with sane values and the acceptance summary (no timing is asserted, only that times were measured)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gan.checkpoints import load_generator
from gan.distill import DistillConfig, save_student, train_student
from gan.styles import get_style

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import distill as bench_distill  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
for var in ("TOONIFY_VGG16_PATH", "TOONIFY_LPIPS_PATH", "TOONIFY_MODELS_DIR"):
    ENV.pop(var, None)  # the demo style and the discriminator-feature loss, whatever the caller's setup


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-step student of the demo style: the bench measures whatever it is given."""
    style = get_style("demo")
    base, toon = load_generator(style.base), load_generator(style.toon)
    student = train_student(base, toon, style.blend, DistillConfig(kimg=0.008, batch_size=4, channels=8))
    return save_student(student, tmp_path_factory.mktemp("student") / "tiny.safetensors")


def test_quick_run_with_a_given_student(tmp_path: Path, tiny_student: Path) -> None:
    out = tmp_path / "distill.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "distill.py"), "--quick", "--device", "cpu", "--threads", "1",
         "--student", str(tiny_student), "--json", str(out)],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    meta, summary = data["meta"], data["summary"]
    assert meta["quick"] is True and meta["style"] == "demo" and meta["balanced_loss"] == "d-features"
    assert meta["student"]["source"] == "--student" and meta["student"]["path"] == str(tiny_student)
    assert meta["student"]["meta"]["training"]["channels"] == 8  # the given student, not one trained on the fly

    plan = bench_distill.QUICK
    rows = {bench_distill.row_key(r): r for r in data["rows"]}
    assert sorted(rows, key=repr) == sorted(bench_distill.expected_rows(plan, ["cpu"]), key=repr)

    for path in bench_distill.PATHS:
        q = rows[("quality", path)]
        assert q["faces"] == plan.holdout
        assert 5 < q["psnr_min"] <= q["psnr"] < 100, q  # a toon of the right face, not noise, not a copy
        assert 0 <= q["dfeat"] <= q["dfeat_max"] and math.isfinite(q["dfeat_max"]), q

    faces = {"real": len(bench_distill.PORTRAITS), "procedural": plan.procedural, "generated": plan.holdout}
    for (_, name, _path), row in ((k, r) for k, r in rows.items() if k[0] == "identity"):
        assert row["faces"] == row["of"] == faces[name], row
        assert 0 <= row["readable"] <= row["inputs_readable"] <= row["faces"], row
        assert row["distance"] is None or 0 <= row["distance"] < 2, row  # descriptors are unit-scale
    assert rows[("identity", "real", "student")]["inputs_readable"] == 1  # dlib reads the aligned astronaut

    for model, res in (("demo", 64), ("config-f", plan.cf_resolution)):
        for batch in plan.batches:
            student, balanced = (
                rows[("speed", model, "cpu", "student", batch)],
                rows[("speed", model, "cpu", "balanced", batch)],
            )
            assert student["res"] == balanced["res"] == res
            for row in (student, balanced):
                assert math.isfinite(row["faces_s"]) and row["faces_s"] > 0, row
                assert row["s_per_face"] == pytest.approx(1 / row["faces_s"])
            timed = plan.demo_timed_steps if model == "demo" else plan.cf_timed_steps
            assert balanced["steps"] == 40 and balanced["timed_steps"] == timed
            assert balanced["extrapolated_steps"] == 40 - timed
            assert balanced["pass_faces"] == batch and balanced["passes"] == 1  # toy sizes: one pass holds them

    speedups = summary["speedup_per_face"]
    assert sorted(speedups) == sorted(f"{m} cpu batch {b}" for m in ("demo", "config-f") for b in plan.batches)
    assert all(math.isfinite(v) and v > 0 for v in speedups.values())
    assert summary["cpu_demo_min_speedup"] == min(v for k, v in speedups.items() if k.startswith("demo "))
    student_q, balanced_q = rows[("quality", "student")], rows[("quality", "balanced")]
    assert summary["psnr_student_minus_balanced_db"] == pytest.approx(student_q["psnr"] - balanced_q["psnr"])
    assert summary["dfeat_student_over_balanced"] == pytest.approx(student_q["dfeat"] / balanced_q["dfeat"])
    assert (
        "## acceptance (issue 13)" in proc.stdout and "speed-up per face, student / balanced, demo cpu" in proc.stdout
    )
