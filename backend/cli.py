"""Backend commands of the ``toonify`` CLI: ``db``, ``worker``, ``submit`` (plus every ``gan`` command).

``toonify submit PHOTO --out OUT.png`` is the whole service on one machine: with no ``REDIS_URL`` it starts an
embedded Redis, with no ``DATABASE_URL`` it uses SQLite under ``TOONIFY_DATA_DIR``, runs a worker in the same
process, submits the photo as a job, prints live progress and writes the result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

from backend.config import Settings

# backend.jobs.MODES, spelled out so that `toonify --help` does not import torch (a test keeps them equal)
SUBMIT_MODES = ("instant", "fast", "balanced", "quality")


def add_backend_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("db", help="database migrations")
    s.add_argument("action", choices=["upgrade", "current", "downgrade"])
    s.add_argument("revision", nargs="?", default=None, help="target revision (upgrade: head, downgrade: -1)")
    s.set_defaults(func=cmd_db)

    s = sub.add_parser("worker", help="run a GPU worker for the toon and finetune queues")
    s.add_argument("--queues", default="toon,finetune", help="comma separated: toon, finetune")
    s.set_defaults(func=cmd_worker)

    s = sub.add_parser("submit", help="toonify a photo through the queue (embedded Redis + in-process worker)")
    s.add_argument("photo")
    s.add_argument("--out", required=True, help="composite PNG to write; crops go next to it")
    s.add_argument("--style")
    s.add_argument("--blend", help="swap resolution, e.g. 16 or 32 (default: the style's)")
    s.add_argument(
        "--mode",
        choices=SUBMIT_MODES,
        default=None,
        help="default: instant where the style has an instant model for the blend, else balanced",
    )
    s.add_argument("--largest-face", action="store_true", help="only the largest face")
    s.add_argument("--no-worker", action="store_true", help="do not run a worker here (one runs elsewhere)")
    s.add_argument("--user", default="local", help="user id recorded for the job")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("forget", help="delete every job, photo and result of a user")
    s.add_argument("--platform", default="cli")
    s.add_argument("--user", default="local")
    s.set_defaults(func=cmd_forget)

    s = sub.add_parser("stats", help="job counts by status, queue lengths, users")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("health", help="check Redis, the database (and a worker, the models): exit 0 when healthy")
    s.add_argument("--worker", action="store_true", help="also require a live worker heartbeat")
    s.add_argument("--models", action="store_true", help="also load the models")
    s.set_defaults(func=cmd_health)


EXIT_UNAVAILABLE = 3  # the database or Redis could not be reached: trying again later may work


def reports_failures(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command that ends with one line naming what failed: the database or Redis out of reach (exit 3), or a
    refused request (exit 2), instead of a driver's traceback."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        from backend.errors import ServiceError, UnavailableError

        try:
            return command(args)
        except UnavailableError as e:
            print(f"toonify: {e}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        except ServiceError as e:
            print(f"toonify: {e}", file=sys.stderr)
            return 2

    return run


@reports_failures
def cmd_db(args: argparse.Namespace) -> int:
    from backend.db import current_revision, downgrade, upgrade

    url = Settings.from_env().database_url
    if args.action == "upgrade":
        upgrade(url, args.revision or "head")
    elif args.action == "downgrade":
        downgrade(url, args.revision or "-1")
    print(f"{url}: at revision {current_revision(url) or 'none'}")
    return 0


@reports_failures
def cmd_worker(args: argparse.Namespace) -> int:
    from backend.worker import run_worker

    queues = tuple(q.strip() for q in args.queues.split(",") if q.strip())
    if not set(queues) <= {"toon", "finetune"} or not queues:
        raise ValueError("--queues takes toon, finetune or both")
    asyncio.run(run_worker(Settings.from_env(), queues))
    return 0


def _bar(step: int | None, total: int | None, width: int = 24) -> str:
    if not total:
        return ""
    done = round(width * (step or 0) / total)
    return f"[{'#' * done}{'.' * (width - done)}] {step}/{total}"


async def _submit(args: argparse.Namespace) -> int:
    from backend.service import Actor, ToonService
    from backend.worker import serving_worker

    service = await ToonService.open(Settings.from_env())
    try:
        async with contextlib.AsyncExitStack() as stack:
            if not args.no_worker:
                await stack.enter_async_context(serving_worker(service.rt, ("toon",)))
            return await _submit_and_watch(service, Actor(platform="cli", user_id=args.user, name=args.user), args)
    finally:
        await service.close()


async def _submit_and_watch(service, actor, args: argparse.Namespace) -> int:
    ticket = await service.submit_toon(
        actor,
        None,
        Path(args.photo).read_bytes(),
        style=args.style,
        blend=args.blend,
        mode=args.mode,
        all_faces=not args.largest_face,
    )
    print(f"job {ticket.job_id} {'(already submitted) ' if ticket.duplicate else ''}{ticket.status}", file=sys.stderr)
    last = None
    async for ev in service.watch(ticket.job_id):
        line = f"  {ev.status:9} {ev.stage or '':8} {_bar(ev.step, ev.total)} {ev.message or ''}".rstrip()
        if ev.queue_position is not None:
            line += f"  (position {ev.queue_position + 1}, ~{ev.eta_s or 0:.0f} s)"
        if line != last:
            print(line, file=sys.stderr)
            last = line
        if ev.terminal:
            if ev.status != "done":
                print(f"toonify: job {ev.status}: {ev.error}", file=sys.stderr)
                return 1
            break
    out = await service.result(ticket.job_id)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.composite)
    for i, crop in enumerate(out.crops):
        path.with_name(f"{path.stem}_toon{i}.png").write_bytes(crop)
    await service.claim_delivery(ticket.job_id)
    print(
        f"wrote {path} and {len(out.crops)} crop(s); style {out.style}, blend {json.dumps(out.spec)}, mode {out.mode}",
        file=sys.stderr,
    )
    return 0


@reports_failures
def cmd_submit(args: argparse.Namespace) -> int:
    return asyncio.run(_submit(args))


@reports_failures
def cmd_forget(args: argparse.Namespace) -> int:
    from backend.service import Actor, ToonService

    async def run() -> int:
        service = await ToonService.open(Settings.from_env())
        try:
            report = await service.forget_user(Actor(platform=args.platform, user_id=args.user))
        finally:
            await service.close()
        print(f"deleted {report.jobs} job(s), {report.blobs} blob(s) ({report.files} file(s)), {report.votes} vote(s)")
        return 0

    return asyncio.run(run())


@reports_failures
def cmd_stats(args: argparse.Namespace) -> int:
    from backend.service import ToonService

    async def run() -> int:
        service = await ToonService.open(Settings.from_env())
        try:
            print(json.dumps(await service.stats(), indent=2, default=str))
        finally:
            await service.close()
        return 0

    return asyncio.run(run())


def cmd_health(args: argparse.Namespace) -> int:
    from backend.health import run_checks

    checks = run_checks(Settings.from_env(), worker=args.worker, models=args.models)
    for c in checks:
        print(c.line())
    return 0 if all(c.ok for c in checks) else 1


def build_parser() -> argparse.ArgumentParser:
    try:
        from gan.cli import build_parser as gan_parser
    except ImportError:  # the bot image has no torch: the service and bot commands only
        p = argparse.ArgumentParser(prog="toonify", description="Toonify service and bots (no model commands here)")
        p.add_subparsers(dest="command", required=True)
    else:
        p = gan_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    add_backend_commands(sub)
    return p


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse and dispatch; bad input ends with a one-line message and exit status 2."""
    try:
        from gan.cli import run as gan_run
    except ImportError:
        args = parser.parse_args(argv)
        try:
            return args.func(args)
        except (ValueError, OSError) as e:
            print(f"toonify: error: {e}", file=sys.stderr)
            return 2
    return gan_run(parser, argv)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)
