"""bench/styles_add.py runs its quick plan and prints a row per preview setting (numbers are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_plan_prints_and_writes_both_rows(tmp_path):
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, "bench/styles_add.py", "--quick", "--json", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["preview"] for r in rows] == [True, False]
    assert all(r["seconds"] > 0 and r["shares_base"] and r["resolution"] == 32 for r in rows)
    assert run.stdout.count("toy") == 2
