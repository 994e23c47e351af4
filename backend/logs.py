"""Logging set-up: one line per event, as JSON (``TOONIFY_LOG_FORMAT=json``) or text, with the job id on every
line logged while a job runs (a context variable, so tasks and worker threads of the job inherit it)."""

from __future__ import annotations

import contextvars
import json
import logging
import time

JOB_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("toonify_job_id", default=None)


class _JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = JOB_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", "job_id"?, "exc"?} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if getattr(record, "job_id", None):
            entry["job_id"] = record.job_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job = getattr(record, "job_id", None)
        return f"{line} [job {job}]" if job else line


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Replace the root handlers with one stream handler in the chosen format."""
    handler = logging.StreamHandler()
    handler.addFilter(_JobIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
