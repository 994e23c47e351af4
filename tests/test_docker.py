"""docker/: what can be checked without a Docker engine. The compose file parses and is complete, every file
the images copy exists, every command the images and compose run is a real `toonify` command, the bot
image's code path runs without torch, and pinned requirements match what the tests ran with."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def dockerfile(name: str) -> list[str]:
    text = (DOCKER / name).read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_compose_has_every_service_with_health_checks_and_restart_policies():
    c = compose()
    services = c["services"]
    assert set(services) == {"redis", "postgres", "migrate", "worker", "telegram", "discord"}
    for name, svc in services.items():
        if name != "migrate":
            assert svc["restart"] == "unless-stopped", name
            assert "healthcheck" in svc, name
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    for name in ("worker", "telegram", "discord"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
        env = services[name]["environment"]
        assert env["REDIS_URL"] == "redis://redis:6379/0" and env["DATABASE_URL"].startswith("postgresql+asyncpg://")
    declared = set(c["volumes"])
    for svc in services.values():
        for v in svc.get("volumes", []):
            source = v.split(":")[0]
            if not source.startswith(("$", ".", "/")):
                assert source in declared, v
    for image in (services["redis"]["image"], services["postgres"]["image"]):
        assert re.search(r":\d+\.\d+", image), f"unpinned image {image}"


def test_compose_builds_reference_existing_files_and_env_example_covers_every_variable():
    c = compose()
    for svc in c["services"].values():
        if "build" in svc:
            context = (DOCKER / svc["build"]["context"]).resolve()
            assert (context / svc["build"]["dockerfile"]).is_file()
    used = set(re.findall(r"\$\{(\w+)", (DOCKER / "compose.yaml").read_text()))
    example = {
        line.split("=")[0]
        for line in (DOCKER / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert used <= example, used - example
    assert (ROOT / "gan" / "demo_models" / "manifest.json").is_file()  # the default models mount


@pytest.mark.parametrize("name", ["Dockerfile.bot", "Dockerfile.worker"])
def test_images_are_multi_stage_pinned_non_root_and_copy_existing_files(name):
    lines = dockerfile(name)
    froms = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage"
    assert all(":" in f and not f.endswith(":latest") for f in froms)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "data" in ignored and ".git" in ignored


def _toonify_args(lines: list[str]) -> list[list[str]]:
    """Arguments the image runs: CMD, and HEALTHCHECK's CMD (after the `toonify` entrypoint)."""
    found = []
    for line in lines:
        for m in re.finditer(r"CMD (\[.*\])", line):
            args = yaml.safe_load(m.group(1))
            found.append(args[1:] if args[0] == "toonify" else args)
    return found


def test_every_command_in_images_and_compose_is_a_toonify_command():
    from bots.cli import build_parser

    parser = build_parser()
    commands = [
        svc["command"]
        for name, svc in compose()["services"].items()
        if name in ("migrate", "worker", "telegram", "discord")
    ]
    for svc in compose()["services"].values():
        test = svc.get("healthcheck", {}).get("test", [])
        if test[:2] == ["CMD", "toonify"]:
            commands.append(test[2:])
    for name in ("Dockerfile.bot", "Dockerfile.worker"):
        commands += _toonify_args(dockerfile(name))
    assert len(commands) >= 8
    for args in commands:
        parser.parse_args(args)  # SystemExit (a failure) for anything unknown


def test_bot_image_code_path_runs_without_torch(tmp_path):
    """The bot image installs no torch or dlib: its whole command path must import without them."""
    code = (
        "import sys\n"
        "for m in ('torch', 'dlib', 'safetensors'): sys.modules[m] = None\n"
        "import bots.telegram, bots.discord, backend.service, backend.health\n"
        "from bots.cli import build_parser\n"
        "p = build_parser(); p.parse_args(['bot', 'discord']); p.parse_args(['db', 'upgrade'])\n"
        "sys.exit(__import__('bots.cli', fromlist=['main']).main(['db', 'upgrade']))\n"
    )
    env = {**os.environ, "TOONIFY_DATA_DIR": str(tmp_path / "data")}
    env.pop("DATABASE_URL", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "at revision" in r.stdout


def test_pinned_requirements_are_the_tested_versions():
    pins = {}
    for name in ("requirements-bot.txt", "requirements-worker.txt"):
        for line in (DOCKER / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if "==" in line:
                pkg, ver = line.split("==")
                pins[re.sub(r"\[.*\]", "", pkg)] = ver
    assert "torch" not in pins
    for pkg, ver in pins.items():
        assert version(pkg) == ver, f"{pkg}: pinned {ver}, tested with {version(pkg)}"


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", duration)
    assert m, f"unreadable duration {duration!r}"
    return int(m[1]) * (60 if m[2] == "m" else 1)


def test_compose_lets_workers_and_bots_drain_before_docker_kills_them():
    """Docker sends SIGKILL 10 s after SIGTERM unless told otherwise: too soon for a grace period of 30 s."""
    from backend.config import Settings
    from backend.worker import HAND_BACK_WAIT_S

    grace = Settings().shutdown_grace_s
    services = compose()["services"]
    assert _seconds(services["worker"]["stop_grace_period"]) >= grace + HAND_BACK_WAIT_S
    for bot in ("telegram", "discord"):
        assert _seconds(services[bot]["stop_grace_period"]) >= grace + 30  # + a photo on its way
