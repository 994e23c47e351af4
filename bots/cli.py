"""The ``toonify`` command line: every ``gan`` and ``backend`` command, plus ``bot`` and ``up``.

``toonify up`` is the one-process deployment: it opens the service (embedded Redis when ``REDIS_URL`` is unset,
SQLite when ``DATABASE_URL`` is unset), runs a worker, and starts each bot whose token is set
(``TELEGRAM_TOKEN``, ``DISCORD_TOKEN``). ``toonify bot telegram|discord`` runs one front end alone, for
deployments where workers run elsewhere.

SIGTERM or SIGINT stops both gracefully and exits 0: no new updates or commands are taken, running commands get
``TOONIFY_SHUTDOWN_GRACE_S`` to finish, and deliveries still unfinished then are carried on by the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from backend.cli import reports_failures
from backend.config import Settings
from backend.logs import configure_logging

FRONT_ENDS = ("telegram", "discord")
BOT_STOP_MARGIN_S = 45  # beyond the grace period: a photo on its way (bots.core.IN_FLIGHT_WAIT_S), closing
log = logging.getLogger("toonify")


def _tokens(names: tuple[str, ...]) -> dict[str, str]:
    return {n: os.environ[f"{n.upper()}_TOKEN"] for n in names if os.environ.get(f"{n.upper()}_TOKEN")}


async def _run_front_end(name: str, service, token: str, stop: asyncio.Event) -> None:
    if name == "telegram":
        from bots.telegram import run_telegram

        await run_telegram(service, token, stop)
    else:
        from bots.discord import run_discord

        await run_discord(service, token, stop)


async def serve(front_ends: tuple[str, ...], *, with_worker: bool, stop: asyncio.Event | None = None) -> None:
    """Run the given front ends (and a worker) on one service until SIGINT/SIGTERM or ``stop``."""
    from backend import metrics
    from backend.service import ToonService
    from backend.worker import serving_worker

    settings = Settings.from_env()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    service = await ToonService.open(settings)
    metrics.serve(settings.metrics_port)
    try:
        async with contextlib.AsyncExitStack() as stack:
            watched = []  # a task that ends early (a crashed bot or worker) ends the process
            if with_worker:
                _, worker_tasks = await stack.enter_async_context(serving_worker(service.rt))
                watched += worker_tasks
            tokens = _tokens(front_ends)
            bots = [
                asyncio.create_task(_run_front_end(name, service, tokens[name], stop), name=name)
                for name in front_ends
                if name in tokens
            ]
            for name in set(front_ends) - set(tokens):
                log.warning("%s_TOKEN is not set: the %s bot does not start", name.upper(), name)
            print(
                f"toonify: serving ({', '.join(sorted(tokens)) or 'no bots'}{', worker' if with_worker else ''}); "
                f"Redis {service.rt.redis.url}, database {settings.database_url}",
                file=sys.stderr,
            )
            waiter = asyncio.create_task(stop.wait())
            try:
                done, _ = await asyncio.wait([waiter, *watched, *bots], return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t is not waiter and t.exception() is not None:
                        raise t.exception()
            finally:
                # The bots stop taking updates and give their running commands shutdown_grace_s to finish (what
                # is left is released, for the next start to carry on); the worker stops after them.
                stop.set()
                waiter.cancel()
                if bots:
                    await asyncio.wait(bots, timeout=settings.shutdown_grace_s + BOT_STOP_MARGIN_S)
                for t in bots:
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
    finally:
        await service.close()


@reports_failures
def cmd_up(args: argparse.Namespace) -> int:
    asyncio.run(serve(FRONT_ENDS, with_worker=not args.no_worker))
    return 0


@reports_failures
def cmd_bot(args: argparse.Namespace) -> int:
    if not _tokens((args.platform,)):
        raise ValueError(f"set {args.platform.upper()}_TOKEN first (see the README: 'Running the bots')")
    asyncio.run(serve((args.platform,), with_worker=args.with_worker))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from backend.cli import build_parser as backend_parser

    p = backend_parser()
    p.description = (
        "Toonify: selfies to cartoon portraits. Model commands (toon, blend, convert, finetune, ...), the service "
        "(submit, worker, db, health, ...) and the bots (up, bot)."
    )
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    s = sub.add_parser("up", help="everything in one process: embedded defaults, a worker, the bots with tokens")
    s.add_argument("--no-worker", action="store_true", help="workers run elsewhere")
    s.set_defaults(func=cmd_up)
    s = sub.add_parser("bot", help="run one front end (workers run elsewhere unless --with-worker)")
    s.add_argument("platform", choices=FRONT_ENDS)
    s.add_argument("--with-worker", action="store_true")
    s.set_defaults(func=cmd_bot)
    from bots.studio import add_studio_parser  # gradio itself loads only when the studio starts

    add_studio_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from backend.cli import run

    args = sys.argv[1:] if argv is None else argv
    serving = bool(args) and args[0] in ("up", "bot", "worker")  # long-running: say what happens
    level = os.environ.get("TOONIFY_LOG_LEVEL") or ("INFO" if serving else "WARNING")
    configure_logging(level, os.environ.get("TOONIFY_LOG_FORMAT", "text"))
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
