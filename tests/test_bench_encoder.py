"""bench/encoder.py: the quick plan runs end to end on CPU; every row is printed as a table row and written to the
JSON with finite numbers where numbers belong (no timing is asserted, only that times were measured)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import encoder as bench_encoder  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
for var in ("TOONIFY_VGG16_PATH", "TOONIFY_LPIPS_PATH", "TOONIFY_MODELS_DIR"):
    ENV.pop(var, None)  # the demo style and the discriminator-feature loss, whatever the caller's setup


def _finite(v: object) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _table_rows(stdout: str, title_start: str) -> list[list[str]]:
    """The cells of each body row of the markdown table whose heading starts with ``title_start``."""
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"## {title_start}"))
    rows = []
    for ln in lines[start + 3 :]:  # heading, header, separator
        if not ln.startswith("| "):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows


def test_quick_plan_prints_and_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "encoder.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "encoder.py"), "--quick", "--device", "cpu", "--threads", "1",
         "--json", str(out)],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["quick"] is True and data["meta"]["style"] == "demo" and data["meta"]["peak_rss_gib"] > 0
    plan = bench_encoder.QUICK
    rows = {bench_encoder.row_key(r): r for r in data["rows"]}
    assert sorted(rows, key=repr) == sorted(bench_encoder.expected_rows(plan, ["cpu"]), key=repr)

    generated, real = rows[("report", "generated")], rows[("report", "real")]
    assert generated["faces"] == plan.holdout
    for key in ("psnr", "psnr_min", "dfeat", "dfeat_max", "latent_mse"):
        assert _finite(generated[key]), (key, generated)
    assert 10 < generated["psnr_min"] <= generated["psnr"] < 60 and generated["dfeat"] <= generated["dfeat_max"]
    assert real["faces"] == real["aligned"] >= 1  # every image in tests/fixtures has a face dlib aligns
    assert _finite(real["psnr"]) and _finite(real["dfeat"]) and 0 < real["id_photo_box"] < 2, real
    assert data["report"]["real"]["inputs_readable"] == real["faces"]

    for mode in bench_encoder.MODES:
        row = rows[("modes", mode)]
        assert row["faces"] == real["faces"] and _finite(row["s_per_face"]) and row["s_per_face"] > 0, row
        assert _finite(row["psnr"]) and _finite(row["dfeat"]) and 0 < row["id_photo_box"] < 2, row
        assert row["identity"] is None or 0 <= row["identity"] < 2, row
    assert rows[("modes", "fast")]["steps"] == 0
    assert rows[("modes", "quality")]["steps"] == plan.max_mode_steps
    fast, report_real = rows[("modes", "fast")], rows[("report", "real")]
    assert fast["psnr"] == report_real["psnr"]  # fast mode is the encoder alone: the report's reconstruction

    for res in plan.train_resolutions:
        row = rows[("train", res, "cpu")]
        assert "error" not in row, row
        assert row["steps"] == plan.timed_steps and row["batch"] == plan.train_batch
        assert _finite(row["s_per_step"]) and row["s_per_step"] > 0 and _finite(row["final_loss"]), row
        assert math.isclose(row["img_s"] * row["s_per_step"], plan.train_batch)
        assert row["loss"] == "d-features" and row["peak_gib"] is None  # CPU: the header has the process's RSS

    # the printed tables: one row per JSON row, the same column count as the header, numbers where numbers go
    report_rows = _table_rows(proc.stdout, "report")
    assert [r[0] for r in report_rows] == ["generated", "real"]
    assert all(len(r) == len(bench_encoder.COLUMNS["report"]) for r in report_rows)
    mode_rows = _table_rows(proc.stdout, "identity per mode")
    assert [r[0] for r in mode_rows] == list(bench_encoder.MODES)
    for r in mode_rows:
        assert math.isfinite(float(r[3])) and math.isfinite(float(r[8]))  # psnr, s_per_face
    train_rows = _table_rows(proc.stdout, "train step")
    assert [int(r[1]) for r in train_rows] == list(plan.train_resolutions)
    assert all(math.isfinite(float(r[7])) and float(r[7]) > 0 for r in train_rows)  # s_per_step
