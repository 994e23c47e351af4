"""Settings come from the environment with embedded defaults; bad values fail naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.config import Settings


def test_defaults_need_no_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({})
    assert s.data_dir == tmp_path / "data"
    assert s.database_url == f"sqlite+aiosqlite:///{tmp_path / 'data' / 'toonify.db'}"
    assert s.blobs_dir == tmp_path / "data" / "blobs"
    assert s.redis_url is None and s.device is None and s.models_dir is None
    assert (s.selfie_retention_s, s.result_retention_s) == (86400, 7 * 86400)
    assert s.max_upload_bytes == 20 * 1024 * 1024
    q = s.quotas
    assert (q.user_active, q.user_daily, q.community_daily, q.max_queue) == (2, 50, 1000, 200)
    assert (s.job_timeout_s, s.toon_max_jobs, s.finetune_max_jobs) == (600, 8, 1)
    assert (s.shutdown_grace_s, s.redis_retry_s) == (30, 60)
    assert (s.db_connect_timeout_s, s.db_statement_timeout_s) == (5.0, 10.0)
    from gan.distill import DistillConfig

    assert s.distill_kimg == DistillConfig().kimg  # the service queues gan.distill's own default length


def test_every_variable_is_read(tmp_path: Path) -> None:
    env = {
        "TOONIFY_DATA_DIR": str(tmp_path / "d"),
        "DATABASE_URL": "postgresql+asyncpg://u:p@db:5432/toonify",
        "REDIS_URL": "redis://cache:6379/2",
        "TOONIFY_DEVICE": "cuda:1",
        "TOONIFY_SELFIE_RETENTION_S": "60",
        "TOONIFY_RESULT_RETENTION_S": "120",
        "TOONIFY_MAX_UPLOAD_BYTES": "1000",
        "TOONIFY_QUOTA_USER_ACTIVE": "3",
        "TOONIFY_QUOTA_USER_DAILY": "4",
        "TOONIFY_QUOTA_COMMUNITY_DAILY": "5",
        "TOONIFY_QUOTA_MAX_QUEUE": "6",
        "TOONIFY_JOB_TIMEOUT_S": "7",
        "TOONIFY_TOON_MAX_JOBS": "2",
        "TOONIFY_FINETUNE_MAX_JOBS": "3",
        "TOONIFY_MODELS_DIR": str(tmp_path / "models"),
        "TOONIFY_SHUTDOWN_GRACE_S": "0",
        "TOONIFY_REDIS_RETRY_S": "9",
        "TOONIFY_DB_CONNECT_TIMEOUT_S": "1.5",
        "TOONIFY_DB_STATEMENT_TIMEOUT_S": "2",
        "TOONIFY_DELIVERY_LEASE_S": "3.5",
        "TOONIFY_DISTILL_KIMG": "0.5",
    }
    s = Settings.from_env(env)
    assert s.data_dir == tmp_path / "d"
    assert s.database_url == "postgresql+asyncpg://u:p@db:5432/toonify"
    assert s.redis_url == "redis://cache:6379/2"
    assert s.device == "cuda:1"
    assert (s.selfie_retention_s, s.result_retention_s, s.max_upload_bytes) == (60, 120, 1000)
    q = s.quotas
    assert (q.user_active, q.user_daily, q.community_daily, q.max_queue) == (3, 4, 5, 6)
    assert (s.job_timeout_s, s.toon_max_jobs, s.finetune_max_jobs) == (7, 2, 3)
    assert s.models_dir == tmp_path / "models"
    assert (s.shutdown_grace_s, s.redis_retry_s) == (0, 9)
    assert (s.db_connect_timeout_s, s.db_statement_timeout_s) == (1.5, 2.0)
    assert s.distill_kimg == 0.5
    assert s.delivery_lease_s == 3.5


def test_sqlite_default_follows_the_data_dir(tmp_path: Path) -> None:
    assert Settings.from_env({"TOONIFY_DATA_DIR": str(tmp_path)}).database_url.endswith(f"{tmp_path}/toonify.db")
    assert Settings(data_dir=tmp_path).database_url == f"sqlite+aiosqlite:///{tmp_path}/toonify.db"
    assert Settings.from_env({"TOONIFY_DATA_DIR": str(tmp_path), "DATABASE_URL": ""}).database_url.startswith(
        "sqlite+aiosqlite:///"
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TOONIFY_QUOTA_USER_DAILY", "lots"),
        ("TOONIFY_MAX_UPLOAD_BYTES", "2.5"),
        ("TOONIFY_JOB_TIMEOUT_S", "0"),
        ("TOONIFY_SELFIE_RETENTION_S", "-1"),
        ("DATABASE_URL", "not a url"),
        ("DATABASE_URL", "mysql://u@h/db"),
        ("REDIS_URL", "http://localhost:6379"),
        ("TOONIFY_SHUTDOWN_GRACE_S", "-1"),
        ("TOONIFY_REDIS_RETRY_S", "0"),
        ("TOONIFY_DB_CONNECT_TIMEOUT_S", "0"),
        ("TOONIFY_DB_STATEMENT_TIMEOUT_S", "nan"),
        ("TOONIFY_DISTILL_KIMG", "0"),
        ("TOONIFY_DELIVERY_LEASE_S", "0"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})


def test_settings_are_frozen() -> None:
    s = Settings.from_env({})
    with pytest.raises(AttributeError):
        s.job_timeout_s = 1  # type: ignore[misc]
