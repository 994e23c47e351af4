"""bench/gpu.py: the quick plan runs end to end on CPU and its JSON has every row; the script imports nothing
that a bare GPU machine lacks (dlib, SQLAlchemy, arq)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu as bench_gpu  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
for var in ("TOONIFY_VGG16_PATH", "TOONIFY_LPIPS_PATH"):
    ENV.pop(var, None)


def test_quick_plan_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--quick", "--threads", "1",
         "--profile-r1", "--out", str(out)],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["quick"] is True and data["meta"]["peak_rss_gib"] > 0
    rows = {bench_gpu.row_key(r): r for r in data["rows"]}
    expected = bench_gpu.expected_rows(bench_gpu.QUICK)
    assert sorted(rows, key=repr) == sorted(expected, key=repr)
    assert len(expected) == 2 * 3 * 2 + 2 * 3 * 3 + 2 + 2  # every section, every size
    for key, row in rows.items():
        assert "error" not in row, (key, row)
        assert row["peak_gib"] is None  # CPU: no per-row peak (the header has the process's RSS)
    for key, row in rows.items():
        section = key[0]
        value = {"synthesis": "img_s", "projection": "s_per_face", "finetune": "s_per_kimg", "encoder": "img_s"}
        assert math.isfinite(row[value[section]]) and row[value[section]] > 0, (key, row)
    for res in bench_gpu.QUICK.proj_resolutions:  # fast mode takes no steps; the others are cut to max_steps
        assert rows[("projection", res, "fast", 1)]["steps"] == 0
        balanced = rows[("projection", res, "balanced", 8)]
        assert balanced["steps"] == 40 and balanced["timed_steps"] == bench_gpu.QUICK.max_steps
        assert balanced["extrapolated_steps"] == 40 - bench_gpu.QUICK.max_steps
    for res in bench_gpu.QUICK.ft_resolutions:  # R1 amortised over a whole interval: one R1 step timed
        ft = rows[("finetune", res, 4)]
        assert ft["r1_steps"] == bench_gpu.QUICK.r1_windows and ft["timed_steps"] == 16 * ft["r1_steps"]
        assert ft["r1_top_ops"] and all(op["self_ms"] > 0 for op in ft["r1_top_ops"])  # --profile-r1
    assert "## synthesis" in proc.stdout and "## finetune" in proc.stdout


def test_imports_without_dlib_sqlalchemy_arq() -> None:
    code = (
        "import sys\n"
        "for name in ('dlib', 'sqlalchemy', 'arq', 'backend', 'bots'):\n"
        "    sys.modules[name] = None  # any import of these raises ImportError\n"
        "sys.argv = ['gpu.py']\n"
        "import runpy\n"
        f"runpy.run_path({str(ROOT / 'bench' / 'gpu.py')!r}, run_name='not_main')\n"
        "print('imported')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imported" in proc.stdout
