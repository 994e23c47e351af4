"""Processes that start together on a fresh database (a bot and a worker, say) all migrate it: one after the
other, the later ones finding it at head. Real processes racing on a real SQLite file and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from backend.db import current_revision, head_revision

ROOT = Path(__file__).resolve().parents[2]


def test_processes_starting_together_migrate_one_fresh_database(db_url):
    code = "import sys; from backend.db import upgrade; upgrade(sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, db_url], cwd=ROOT, stderr=subprocess.PIPE) for _ in range(4)]
    errors = [p.communicate(timeout=180)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(e[-1500:] for e in errors)
    assert current_revision(db_url) == head_revision()
