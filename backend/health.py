"""``toonify health``: can this process do its job? Redis, SQL (at the newest migration), a live worker,
the models. Exit status 0 when every requested check passes, 1 otherwise; one line per check, for humans
and for an orchestrator's health check alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from backend import keys
from backend.config import Settings


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name:8} {self.detail}"


def check_redis(settings: Settings) -> tuple[Check, str | None]:
    from backend.redis import ping, running_embedded_url

    url = settings.redis_url or running_embedded_url(settings.data_dir / "redis")
    if url is None:
        return Check("redis", False, "REDIS_URL is not set and no embedded Redis runs for this data directory"), None
    shown = url.split("@")[-1]  # never print a password
    if not ping(url, timeout_s=2.0):
        return Check("redis", False, f"no answer from {shown}"), None
    return Check("redis", True, shown), url


def check_database(settings: Settings) -> Check:
    from sqlalchemy.engine import make_url

    from backend.db import current_revision, head_revision
    from backend.errors import UnavailableError

    shown = make_url(settings.database_url).render_as_string(hide_password=True)
    try:
        current = current_revision(settings.database_url)
    except UnavailableError as e:  # it names the database and says what went wrong
        return Check("database", False, str(e))
    except Exception as e:  # any other driver error means "not usable" too
        return Check("database", False, f"{shown}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    head = head_revision()
    if current != head:
        return Check(
            "database", False, f"{shown} is at revision {current or 'none'}, expected {head}: run `toonify db upgrade`"
        )
    return Check("database", True, f"{shown} at revision {current}")


def check_worker(url: str) -> Check:
    import redis as redis_lib

    client = redis_lib.Redis.from_url(url, socket_timeout=2.0)
    try:
        workers = [k.decode() for k in client.scan_iter(keys.WORKER_HEARTBEAT_PATTERN, count=1000)]
    finally:
        client.close()
    if not workers:
        return Check("worker", False, "no worker heartbeat in Redis: start `toonify worker`")
    return Check("worker", True, f"{len(workers)} worker(s) alive")


def check_models(settings: Settings) -> Check:
    from gan.styles import DEMO_DIR, read_manifest

    models_dir = settings.models_dir or DEMO_DIR
    t0 = time.perf_counter()
    try:
        manifest = read_manifest(models_dir)
        from backend.model_cache import ModelCache, base_models_from_manifest

        cache = ModelCache("cpu")
        style = manifest.style()
        cache.toonifier(base_models_from_manifest(models_dir, style.toon), style.toon)
    except Exception as e:
        return Check("models", False, f"{models_dir}: {type(e).__name__}: {e}")
    styles = ", ".join(manifest.styles) or "none"
    return Check("models", True, f"{models_dir} loads in {time.perf_counter() - t0:.1f} s (styles: {styles})")


def run_checks(settings: Settings, *, worker: bool = False, models: bool = False) -> list[Check]:
    """Synchronous on purpose: a health check must work where no event loop runs."""
    redis_check, url = check_redis(settings)
    checks = [redis_check, check_database(settings)]
    if worker:
        checks.append(check_worker(url) if url else Check("worker", False, "skipped: Redis is unreachable"))
    if models:
        checks.append(check_models(settings))
    return checks
