"""Prometheus metrics for workers and bots, served over HTTP when ``TOONIFY_METRICS_PORT`` is set.

Counters and histograms are updated where things happen (the job ledger, the model cache, the bot core);
queue depths are read from Redis by a small loop, because a Prometheus collector must not block on I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("toonify.metrics")
REGISTRY = CollectorRegistry()
_SECONDS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)

QUEUE_DEPTH = Gauge("toonify_queue_depth", "Jobs waiting in each arq queue", ["queue"], registry=REGISTRY)
JOB_SECONDS = Histogram(
    "toonify_job_seconds",
    "Job run time (claimed to finished)",
    ["kind", "mode", "status"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
JOB_WAIT_SECONDS = Histogram(
    "toonify_job_wait_seconds",
    "Time a job waited in the queue before a worker claimed it",
    ["kind", "mode"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
GPU_SECONDS = Counter(
    "toonify_gpu_seconds_total", "Worker seconds spent on jobs, per community", ["community"], registry=REGISTRY
)
JOB_FAILURES = Counter("toonify_job_failures_total", "Failed jobs by reason", ["reason"], registry=REGISTRY)
JOBS_FINISHED = Counter("toonify_jobs_total", "Finished jobs by kind and status", ["kind", "status"], registry=REGISTRY)
MODEL_CACHE = Counter("toonify_model_cache_total", "Model cache lookups", ["result"], registry=REGISTRY)
BOT_COMMANDS = Counter(
    "toonify_bot_commands_total", "Commands and button presses handled", ["platform", "command"], registry=REGISTRY
)
BOT_ERRORS = Counter(
    "toonify_bot_errors_total", "Commands that ended in an error reply", ["platform", "kind"], registry=REGISTRY
)


def serve(port: int | None, addr: str = "0.0.0.0") -> int | None:
    """Start the /metrics HTTP endpoint (a daemon thread) when ``port`` is set; returns the bound port."""
    if port is None:
        return None
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", addr, bound)
    return bound


async def watch_queues(pool, queues: dict[str, str], every_s: float = 5.0) -> None:
    """Keep QUEUE_DEPTH current (run as a task; cancelled on shutdown)."""
    while True:
        with contextlib.suppress(Exception):
            for name, key in queues.items():
                QUEUE_DEPTH.labels(queue=name).set(await pool.zcard(key))
        await asyncio.sleep(every_s)


def failure_reason(error: str | None) -> str:
    """A small, fixed set of labels (Prometheus labels must not carry free text)."""
    text = (error or "").lower()
    for reason, words in (
        ("no_face", ("no face",)),
        ("bad_image", ("image", "file")),
        ("timeout", ("timeout",)),
        ("retries_exhausted", ("attempts",)),
        ("expired", ("expired", "no longer exists")),
    ):
        if any(w in text for w in words):
            return reason
    return "other"
