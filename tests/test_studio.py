"""``toonify studio`` end to end: the studio runs in a subprocess on a free port (its own SQLite file and embedded
Redis) and is driven the way people and programs reach it: gradio_client for the events, plain HTTP for the token
gate, and a headless Chromium (where Debian's package is installed) for the page itself.

The models are the bundled demo ones, listed by a manifest in a temporary folder with two styles: ``demo``, whose
GANSpace directions (one of them named ``smile``) are registered beside it, and ``plain``, with none.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip(
    "gradio_client", reason="the studio extra is not installed: pip install -e '.[dev]'"
)

from gan.styles import DEMO_DIR  # noqa: E402

TOKEN = "studio-test-token"
ADMIN_TOKEN = "studio-admin-token"
PHOTO = Path(__file__).parent / "fixtures" / "astronaut.png"
STARTUP_S = 180
NO_EDIT = [0.0] * 8  # bots.studio.MAX_DIRECTION_SLIDERS


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """A manifest over the demo models (absolute paths): ``demo`` with registered directions, ``plain`` without."""
    import torch

    from gan.checkpoints import load_generator
    from gan.editing import (
        DirectionSet,
        direction_scales,
        directions_meta,
        ganspace_directions,
        name_direction,
        register_directions,
        save_directions,
    )

    folder = tmp_path_factory.mktemp("models")
    demo = json.loads((DEMO_DIR / "manifest.json").read_text())
    style = {"toon": str(DEMO_DIR / "toon.safetensors"), "blend": demo["styles"]["demo"]["blend"]}
    manifest = {
        "base": str(DEMO_DIR / "base.safetensors"),
        "encoder": str(DEMO_DIR / "encoder.safetensors"),
        "default_style": "demo",
        "styles": {"demo": style, "plain": dict(style)},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    torch.manual_seed(0)
    toon = load_generator(DEMO_DIR / "toon.safetensors")
    components, values = ganspace_directions(toon, n_samples=2000, top_k=4, seed=0)
    scales = direction_scales(toon, components, n_samples=2000, seed=0)
    path = folder / "demo.directions.safetensors"
    save_directions(path, DirectionSet(components, scales, values, directions_meta(toon, "ganspace")))
    name_direction(path, 0, "smile", "all")
    register_directions(folder, "demo", path)
    return folder


def _read_line(proc: subprocess.Popen, deadline: float) -> str:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the studio exited with {proc.returncode}; see its studio.stderr")
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            return proc.stdout.readline()
    raise TimeoutError("the studio did not start in time")


@pytest.fixture(scope="module")
def studio(models_dir, tmp_path_factory):
    """The running studio: (base URL, data folder). SIGTERM at the end must stop it cleanly (exit 0)."""
    data = tmp_path_factory.mktemp("studio-data")
    args = ["--token", TOKEN, "--admin-token", ADMIN_TOKEN, "--models-dir", str(models_dir)]
    args += ["--checkpoint", str(DEMO_DIR / "toon.safetensors")]  # stands in for a fine-tune snapshot
    proc, line = _start_studio(args, data)
    try:
        assert "serving at http://127.0.0.1:" in line, line
        url = line.split("serving at ")[1].split()[0]
        assert TOKEN not in line  # a token given by the operator is never printed
        assert _listening_on(int(url.rsplit(":", 1)[1].strip("/"))) in ({"127.0.0.1"}, None)
        yield url, data
    finally:
        code = _stop(proc)
        assert code == 0, (data / "studio.stderr").read_text()[-3000:]


def _listening_on(port: int) -> set[str] | None:
    """The local addresses of the sockets listening on ``port`` (from /proc/net/tcp*; None where there is none)."""
    found, tables = set(), [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        return None
    for table in tables:
        for row in table.read_text().splitlines()[1:] if table.exists() else ():
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                if len(address) == 8:
                    found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
                else:
                    found.add(address)
    return found


def _start_studio(args: list[str], data: Path) -> tuple[subprocess.Popen, str]:
    """Start ``toonify studio --port 0 ARGS`` with its own data folder; returns it and its first line."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "TOONIFY_MODELS_DIR")}
    env.pop("TOONIFY_STUDIO_TOKEN", None)
    env.update(
        TOONIFY_DATA_DIR=str(data),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        GRADIO_ANALYTICS_ENABLED="False",
        TOONIFY_DISTILL_KIMG="0.1",
    )
    cmd = [sys.executable, "-c", "from bots.cli import main; raise SystemExit(main())", "studio", "--port", "0"]
    with open(data / "studio.stderr", "w") as stderr:  # a file: a pipe nobody reads could fill and block it
        proc = subprocess.Popen([*cmd, *args], env=env, cwd=data, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        return proc, _read_line(proc, time.monotonic() + STARTUP_S)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture(scope="module")
def client(studio, tmp_path_factory):
    url, _ = studio
    return gradio_client.Client(
        url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        verbose=False,
        analytics_enabled=False,
        download_files=str(tmp_path_factory.mktemp("downloads")),
    )


def _pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _preview(client, level: int, *, style: str = "demo", width: float = 0.0, seed: int = 0, edits=NO_EDIT):
    image, caption = client.predict(style, level, width, "toon", seed, 0.7, *edits, api_name="/preview")
    return _pixels(image), caption


# ------------------------------------------------------------------------------------------------ the token


def test_nothing_is_served_without_the_token(studio):
    import httpx

    url, _ = studio
    with httpx.Client(timeout=30) as http:
        assert http.get(url).status_code == 401
        assert http.get(url + "config").status_code == 401
        assert http.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get(url, params={"token": "wrong"}).status_code == 401
        cookie = "toonify_studio_" + url.rsplit(":", 1)[1].strip("/")
        with httpx.Client(timeout=30, cookies={cookie: "wrong"}) as wrong_cookie:
            assert wrong_cookie.get(url).status_code == 401
        join = http.post(url + "gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "x"})
        assert join.status_code == 401
        # The right token: the page with a header; ?token= sets the cookie and leaves the token out of the address.
        assert http.get(url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        opened = http.get(url, params={"token": TOKEN})
        assert opened.status_code == 303 and opened.headers["location"] == "/"
        assert TOKEN in opened.headers["set-cookie"] and "httponly" in opened.headers["set-cookie"].lower()
        assert http.get(url + "config").status_code == 200  # the cookie now opens it


def test_a_client_with_a_wrong_token_is_refused(studio):
    url, _ = studio
    with pytest.raises(Exception, match=r"401|Unauthorized|Could not|token"):
        gradio_client.Client(url, headers={"Authorization": "Bearer wrong"}, verbose=False, analytics_enabled=False)


def test_without_a_token_one_is_made_and_printed_once(models_dir, tmp_path):
    import httpx

    proc, line = _start_studio(["--models-dir", str(models_dir)], tmp_path)
    try:
        assert "open http://127.0.0.1:" in line and "?token=" in line, line
        url, token = line.split("open ")[1].split()[0].split("?token=")
        assert len(token) >= 24
        with httpx.Client(timeout=30) as http:
            assert http.get(url).status_code == 401
            assert http.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
            assert http.get(url, headers={"Authorization": f"Bearer {token}x"}).status_code == 401
    finally:
        assert _stop(proc) == 0
    assert token not in proc.stdout.read()  # printed once, with the address


# -------------------------------------------------------------------------------------------------- preview


def test_preview_changes_with_the_swap_level_and_is_repeatable(client):
    low, caption_low = _preview(client, 8)
    high, caption_high = _preview(client, 32)
    again, _ = _preview(client, 8)
    assert "8px" in caption_low and "32px" in caption_high
    assert low.shape == high.shape and low.shape[0] >= 2 * 128  # two rows of faces, shown at least 128 px
    assert np.array_equal(low, again)  # same settings, same pixels: the difference below is the swap level
    half = low.shape[0] // 2
    assert np.array_equal(low[: half - 4], high[: half - 4])  # the base row does not depend on the blend
    assert np.abs(low[half:] - high[half:]).mean() > 1.0  # the blended row does
    smooth, caption = _preview(client, 8, width=1.5)
    assert "smooth" in caption and np.abs(smooth - low).mean() > 0.5


def test_seed_changes_the_faces(client):
    first, _ = _preview(client, 16, seed=0)
    other, _ = _preview(client, 16, seed=5)
    assert np.abs(first - other).mean() > 1.0


def test_a_direction_slider_changes_the_preview(client):
    chosen = client.predict("demo", api_name="/choose")
    note, sliders = chosen[3], chosen[4:]
    assert "1 named direction" in note
    assert sliders[0]["label"] == "smile" and sliders[0]["visible"] is not False
    plain, _ = _preview(client, 16)
    smiling, _ = _preview(client, 16, edits=[2.0, *NO_EDIT[1:]])
    assert np.abs(plain - smiling).mean() > 1.0
    back, _ = _preview(client, 16, edits=NO_EDIT)
    assert np.array_equal(plain, back)


def test_a_style_without_directions_says_so(client):
    chosen = client.predict("plain", api_name="/choose")
    note, sliders = chosen[3], chosen[4:]
    assert "No directions for this style" in note
    assert all(s["visible"] is False for s in sliders)
    # Its sliders do nothing: there is no direction behind them.
    plain, _ = _preview(client, 16, style="plain")
    moved, _ = _preview(client, 16, style="plain", edits=[2.0, *NO_EDIT[1:]])
    assert np.array_equal(plain, moved)


def test_a_snapshot_previews_and_cannot_be_published(client):
    snapshot = "snapshot: toon.safetensors"
    chosen = client.predict(snapshot, api_name="/choose")
    assert "No directions for this snapshot" in chosen[3]
    low, caption = _preview(client, 8, style=snapshot)
    high, _ = _preview(client, 32, style=snapshot)
    assert snapshot in caption and np.abs(low - high).mean() > 1.0
    with pytest.raises(Exception, match="not a style the bots serve"):
        client.predict(snapshot, 8, 0.0, "toon", "telegram", "-1002", ADMIN_TOKEN, api_name="/publish")


def test_style_mixing_grid(client):
    path = client.predict("demo", 16, 0.0, "toon", 0, 0.7, "10,11", "coarse", api_name="/mix")
    coarse = _pixels(path)
    fine = _pixels(client.predict("demo", 16, 0.0, "toon", 0, 0.7, "10,11", "fine", api_name="/mix"))
    assert coarse.shape == fine.shape  # 4 rows (the column sources, then 3 seeds) x 3 columns
    assert coarse.shape[0] > coarse.shape[1]
    assert np.abs(coarse - fine).mean() > 1.0
    with pytest.raises(Exception, match="mix seeds"):
        client.predict("demo", 16, 0.0, "toon", 0, 0.7, "ten", "coarse", api_name="/mix")


# ---------------------------------------------------------------------------------------------------- photo


def test_a_photo_comes_back_as_a_toon(client):
    photo = gradio_client.handle_file(str(PHOTO))
    toon_path, note = client.predict("demo", 16, 0.0, "toon", photo, "balanced", *NO_EDIT, api_name="/toonify")
    original = np.asarray(Image.open(PHOTO).convert("RGB"), dtype=np.int16)
    toon = _pixels(toon_path)
    assert toon.shape == original.shape
    assert "1 face" in note and "balanced" in note
    changed = np.abs(toon - original).max(axis=2) > 24
    assert 0.005 < changed.mean() < 0.5  # the face was replaced, the rest of the photo kept
    # Another blend of the same photo re-renders from its kept latents, and differs.
    other_path, _ = client.predict("demo", 4, 0.0, "toon", photo, "balanced", *NO_EDIT, api_name="/toonify")
    assert np.abs(_pixels(other_path) - toon).mean() > 0.05


def test_instant_mode_without_a_student_is_refused(client):
    photo = gradio_client.handle_file(str(PHOTO))
    with pytest.raises(Exception, match="no instant model"):
        client.predict("demo", 16, 0.0, "toon", photo, "instant", *NO_EDIT, api_name="/toonify")


# -------------------------------------------------------------------------------------------------- publish


def _default_blends(data: Path) -> list[tuple[str, dict]]:
    with contextlib.closing(sqlite3.connect(data / "toonify.db")) as db:
        rows = db.execute(
            "SELECT c.platform_community_id, b.spec FROM blends b JOIN communities c ON c.id = b.community_id "
            "WHERE b.is_default"
        ).fetchall()
    return [(cid, json.loads(spec) if isinstance(spec, str) else spec) for cid, spec in rows]


def test_publish_needs_the_admin_token(client, studio):
    _, data = studio
    with pytest.raises(Exception, match="only the admins"):
        client.predict("demo", 8, 0.0, "toon", "telegram", "-1001", "not-the-admin-token", api_name="/publish")
    with pytest.raises(Exception, match="only the admins"):
        client.predict("demo", 8, 0.0, "toon", "telegram", "-1001", "", api_name="/publish")
    assert not [r for r in _default_blends(data) if r[0] == "-1001"]

    said = client.predict("demo", 8, 0.0, "toon", "telegram", "-1001", ADMIN_TOKEN, api_name="/publish")
    assert "Published" in said and "8px" in said
    assert [(cid, spec["resolution"]) for cid, spec in _default_blends(data) if cid == "-1001"] == [("-1001", 8)]
    # Publishing again moves the default; one default per community and style.
    client.predict("demo", 32, 1.0, "toon", "telegram", "-1001", ADMIN_TOKEN, api_name="/publish")
    mine = [spec for cid, spec in _default_blends(data) if cid == "-1001"]
    assert [(s["mode"], s["resolution"], s["width"]) for s in mine] == [("smooth", 32, 1.0)]


# --------------------------------------------------------------------------------------------------- browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


async def _screenshot_preview(browser: str, url: str, profile: Path) -> tuple[bytes, dict]:
    """Open the page in headless Chromium (DevTools protocol over aiohttp), wait until the preview image has
    loaded, and take a screenshot of its box. Returns (PNG bytes, the box)."""
    import aiohttp

    proc = await asyncio.create_subprocess_exec(
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "--window-size=1280,1800",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    ws_url = None
    try:
        while ws_url is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            if not line:
                raise RuntimeError("chromium exited before it listened")
            if "DevTools listening on" in line:
                ws_url = line.split("listening on", 1)[1].strip()
        drain = asyncio.create_task(proc.stderr.read())  # keep reading: a full pipe would stall the browser
        port = ws_url.split(":")[2].split("/")[0]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                page = next(t for t in await r.json() if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                counter = iter(range(1, 10**6))

                async def call(method: str, **params):
                    msg_id = next(counter)
                    await ws.send_json({"id": msg_id, "method": method, "params": params})
                    while True:
                        msg = await ws.receive_json(timeout=60)
                        if msg.get("id") == msg_id:
                            if "error" in msg:
                                raise RuntimeError(f"{method}: {msg['error']}")
                            return msg["result"]

                await call("Page.enable")
                await call("Page.navigate", url=f"{url}?token={TOKEN}")
                probe = (
                    "(() => { const im = document.querySelector('#studio-preview img');"
                    " if (!im || !im.complete || !im.naturalWidth) return null;"
                    " im.scrollIntoView(); const r = im.getBoundingClientRect();"
                    " return JSON.stringify({x: r.x + scrollX, y: r.y + scrollY,"
                    " width: r.width, height: r.height}); })()"
                )
                deadline = time.monotonic() + 120
                box = None
                while box is None and time.monotonic() < deadline:
                    result = await call("Runtime.evaluate", expression=probe, returnByValue=True)
                    box = json.loads(result["result"]["value"]) if result["result"].get("value") else None
                    if box is None:
                        await asyncio.sleep(0.5)
                assert box is not None, "the page never showed the preview image"
                await asyncio.sleep(0.5)  # let the image paint
                shot = await call(
                    "Page.captureScreenshot", format="png", clip={**box, "scale": 1}, captureBeyondViewport=True
                )
                return base64.b64decode(shot["data"]), box
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await proc.wait()
        if ws_url is not None:
            await drain


def test_the_page_renders_the_preview_in_chromium(studio, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the page is not screenshot")
    url, _ = studio
    png, box = asyncio.run(_screenshot_preview(browser, url, tmp_path / "profile"))
    (tmp_path / "preview.png").write_bytes(png)
    shot = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    assert box["width"] > 100 and box["height"] > 100
    # Faces, not a blank or single-coloured box: many colours, spread out, and most pixels not background.
    colours = len(np.unique(shot.reshape(-1, 3), axis=0))
    background = (np.abs(shot - shot[0, 0]).max(axis=2) < 8).mean()
    assert colours > 500 and shot.std() > 20 and background < 0.6, (colours, shot.std(), background)
