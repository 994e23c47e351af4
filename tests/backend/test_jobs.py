"""Typed job parameters and results keep the JSON shape rows are stored with; Redis names stay what deployed
processes use; the model manifest is parsed once per folder and again only when it changes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from backend import keys, ledger, runtime
from backend.db.models import JobKind
from backend.jobs import (
    DEFAULT_BLEND,
    DistillParams,
    FinetuneParams,
    FinetuneResult,
    PreviewParams,
    ToonParams,
    ToonResult,
    params_from_json,
    queue_of,
)
from gan.blending import BlendSpec
from gan.styles import DEMO_DIR, get_style, load_manifest, read_manifest

SWAP16 = {"mode": "swap", "structure_from": "toon", "resolution": 16, "level": 0}
# Rows as the service wrote them before the typed classes (copied from a database of that time).
OLD_TOON = {"style_id": 1, "style": "demo", "spec": SWAP16, "mode": "fast", "all_faces": False}
OLD_REBLEND = {**OLD_TOON, "reblend_of": "ab" * 16}
OLD_PREVIEW = {"poll_id": 3, "style_id": 1, "style": "demo", "specs": [SWAP16, {**SWAP16, "resolution": 32}]}
OLD_FINETUNE = {"style_id": 2, "dataset_id": 5, "steps": 400, "style": "inky"}
OLD_TOON_RESULT = {"composite": "c" * 64, "crops": ["d" * 64], "faces": 1, "too_small": 0, "style": "demo",
                   "spec": SWAP16, "image_sha256": "e" * 64}  # fmt: skip
OLD_PREVIEW_RESULT = {"composite": "c" * 64, "crops": ["d" * 64, "f" * 64], "faces": 4, "too_small": 0,
                      "style": "demo", "spec": {}, "poll_id": 3}  # fmt: skip
OLD_FINETUNE_RESULT = {"style": "inky", "checkpoint": "/data/styles/2-ab.safetensors", "images": 12,
                       "steps": 400, "metrics": {"kid": 0.01}, "dataset": {"kept": 12},
                       "report": "/data/finetune/x/report.json"}  # fmt: skip


@pytest.mark.parametrize(
    ("cls", "row"),
    [
        (ToonParams, OLD_TOON),
        (ToonParams, OLD_REBLEND),
        (PreviewParams, OLD_PREVIEW),
        (FinetuneParams, OLD_FINETUNE),
        (ToonResult, OLD_TOON_RESULT),
        (ToonResult, OLD_PREVIEW_RESULT),
        (FinetuneResult, OLD_FINETUNE_RESULT),
    ],
)
def test_stored_rows_round_trip_unchanged(cls, row) -> None:
    assert cls.from_json(json.loads(json.dumps(row))).to_json() == row


def test_missing_optional_keys_take_the_defaults_old_rows_ran_with() -> None:
    p = ToonParams.from_json({"style_id": 1, "style": "demo"})
    assert (p.spec, p.mode, p.all_faces, p.reblend_of) == (None, "balanced", True, None)
    assert p.blend() == DEFAULT_BLEND == BlendSpec(mode="swap", resolution=32, structure_from="toon")
    assert p.blend({"mode": "swap", "resolution": 8}) == BlendSpec(mode="swap", resolution=8)  # the style's
    assert ToonParams.from_json(OLD_TOON).blend({"mode": "swap", "resolution": 8}).resolution == 16  # the job's
    f = FinetuneParams.from_json({"style_id": 2, "dataset_id": 5})
    assert (f.steps, f.snapshot_every) == (400, 50)
    r = ToonResult.from_json({"composite": "c" * 64, "crops": ["a" * 64, "b" * 64]})
    assert (r.faces, r.too_small, r.spec) == (2, 0, None)


def test_unknown_keys_are_ignored_and_identity_drops_the_reblend_link() -> None:
    assert ToonParams.from_json({**OLD_TOON, "added_later": 1}) == ToonParams.from_json(OLD_TOON)
    toon, reblend = ToonParams.from_json(OLD_TOON), ToonParams.from_json(OLD_REBLEND)
    assert toon.identity() == reblend.identity() and toon != reblend


def test_kinds_and_queues() -> None:
    assert isinstance(params_from_json(JobKind.TOON, OLD_TOON), ToonParams)
    assert isinstance(params_from_json(JobKind.REBLEND, OLD_REBLEND), ToonParams)
    assert isinstance(params_from_json(JobKind.PREVIEW, OLD_PREVIEW), PreviewParams)
    assert isinstance(params_from_json(JobKind.FINETUNE, OLD_FINETUNE), FinetuneParams)
    assert isinstance(params_from_json(JobKind.DISTILL, {"style_id": 1, "spec": {"mode": "swap", "resolution": 16},
                                                         "kimg": 2}), DistillParams)  # fmt: skip
    long_kinds = (JobKind.FINETUNE, JobKind.DISTILL)  # training runs on its own queue
    assert [queue_of(k) for k in JobKind] == ["finetune" if k in long_kinds else "toon" for k in JobKind]


def test_redis_names_are_the_deployed_ones_and_still_importable_from_their_old_homes() -> None:
    """Workers and bots of one deployment may run different versions for a while: the names must not move."""
    assert keys.QUEUE_NAMES == {"toon": "toonify:queue:toon", "finetune": "toonify:queue:finetune"}
    assert keys.CANCEL_CHANNEL == "toonify:cancel" and keys.STATS_KEY == "toonify:stats:toon_seconds"
    assert keys.job_state("j") == "toonify:job:j:state" and keys.job_progress_channel("j") == "toonify:job:j:progress"
    assert keys.job_cancel("j") == "toonify:job:j:cancel" and keys.worker_heartbeat("w") == "toonify:worker:w"
    assert keys.quota_user_active("user:1") == "toonify:quota:user:user:1:active"
    assert keys.quota_user_daily("user:1", "20260102") == "toonify:quota:user:user:1:daily:20260102"
    assert keys.quota_community_daily("community:2", "20260102") == "toonify:quota:community:community:2:daily:20260102"
    assert runtime.QUEUE_NAMES is keys.QUEUE_NAMES
    assert (ledger.CANCEL_CHANNEL, ledger.STATS_KEY, ledger.cancel_key("j")) == (
        keys.CANCEL_CHANNEL,
        keys.STATS_KEY,
        keys.job_cancel("j"),
    )


def test_manifest_is_parsed_once_per_folder_and_again_when_it_changes(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(DEMO_DIR, models, ignore=shutil.ignore_patterns("previews", "*.safetensors"))
    first = read_manifest(models)
    assert read_manifest(models) is first  # cached
    assert first.base == models / "base.safetensors" and first.encoder == models / "encoder.safetensors"
    assert first.style() is first.styles["demo"] == get_style(None, models)
    assert first.style().blend == BlendSpec.from_json(load_manifest(models)["styles"]["demo"]["blend"])
    with pytest.raises(ValueError, match="unknown style 'nope'"):
        first.style("nope")

    raw = load_manifest(models)
    raw["styles"]["plain"] = {"toon": "plain.safetensors"}  # no blend: the default one
    (models / "manifest.json").write_text(json.dumps(raw))
    st = os.stat(models / "manifest.json")
    os.utime(models / "manifest.json", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    second = read_manifest(models)
    assert second is not first and second.styles["plain"].blend == DEFAULT_BLEND
    assert read_manifest(DEMO_DIR) is not second  # per folder

    with pytest.raises(FileNotFoundError, match="no model manifest"):
        read_manifest(tmp_path / "empty")
