"""Toonify pipeline benchmark: per-stage times and reconstruction quality per mode.

    python bench/toonify.py                         # the bundled demo style, CPU
    python bench/toonify.py --base B --toon T --encoder E --device cuda --faces 1,8

Part 1 times each stage (align, project, render, paste) on a photo holding 1 or 8 copies of the
astronaut portrait (tests/fixtures/astronaut.png). Part 2 projects held-out images drawn from the base model
with each mode, plus plain optimisation for 200 steps from the average latent, and prints PSNR, the
perceptual distance used for projection (LPIPS when configured, else the fallback) and wall time.
Nothing is asserted; numbers are printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gan.images import psnr  # noqa: E402
from gan.pipeline import MODES, Toonifier  # noqa: E402
from gan.projection import ProjectionConfig, project_batch  # noqa: E402


def group_photo(n: int) -> Image.Image:
    face = Image.open(ROOT / "tests/fixtures/astronaut.png").convert("RGB")
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    canvas = Image.new("RGB", (face.width * cols, face.height * rows))
    for i in range(n):
        canvas.paste(face, ((i % cols) * face.width, (i // cols) * face.height))
    return canvas


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def stage_times(tf: Toonifier, faces: list[int], modes: list[str]) -> None:
    print("\n## Stage times (seconds)")
    print(f"{'faces':>5} {'mode':>9} {'align':>7} {'project':>8} {'render':>7} {'paste':>7} {'total':>7}")
    for n in faces:
        photo = group_photo(n)
        for mode in modes:
            if mode == "fast" and tf.encoder is None:
                continue
            r = tf.toonify(photo, mode=mode, all_faces=True)
            t = r.timings
            total = sum(t.values())
            print(
                f"{len(r.crops):>5} {mode:>9} {t['align']:>7.2f} {t['project']:>8.2f} {t['render']:>7.2f} "
                f"{t['paste']:>7.2f} {total:>7.2f}"
            )


def quality(tf: Toonifier, n: int, modes: list[str], plain_steps: int) -> None:
    G = tf.base
    g = torch.Generator().manual_seed(1000)
    with torch.no_grad():
        z = torch.randn(n, G.z_dim, generator=g).to(tf.device)
        ws = G.mapping(z, truncation_psi=0.8).unsqueeze(1).expand(-1, G.num_ws, -1)
        targets = G.synthesis(ws, noise=G.make_noise(n, generator=g))  # seeded: the same targets every run
    print(f"\n## Reconstruction of {n} held-out base-model images (loss: {getattr(tf.loss_fn, 'name', 'pixel')})")
    print(f"{'method':>22} {'steps':>5} {'PSNR dB':>8} {'loss':>8} {'seconds':>8}")
    rows = [(m, tf.modes[m].steps) for m in modes if not (m == "fast" and tf.encoder is None)]
    for mode, steps in rows:
        sync(tf.device)
        t0 = time.perf_counter()
        latents, _ = tf.project(targets, mode)
        sync(tf.device)
        dt = time.perf_counter() - t0
        _report(tf, mode, steps, latents, targets, dt)
    t0 = time.perf_counter()
    res = project_batch(G, targets, tf.loss_fn, ProjectionConfig(steps=plain_steps))
    sync(tf.device)
    _report(tf, "plain (from w_avg)", plain_steps, res.ws, targets, time.perf_counter() - t0, res.noise)


def _report(tf, name, steps, latents, targets, seconds, noise=None) -> None:
    with torch.no_grad():
        images = tf.base.synthesis(latents, noise=noise) if noise else tf.base.synthesis(latents, noise_mode="const")
        loss = tf.loss_fn(images, targets).mean().item()
        p = psnr(images, targets).mean().item()
    print(f"{name:>22} {steps:>5} {p:>8.2f} {loss:>8.4f} {seconds:>8.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--style")
    p.add_argument("--base")
    p.add_argument("--toon")
    p.add_argument("--encoder")
    p.add_argument("--device")
    p.add_argument("--faces", default="1,8")
    p.add_argument("--modes", default="fast,balanced,quality")
    p.add_argument("--holdout", type=int, default=8)
    p.add_argument("--plain-steps", type=int, default=200)
    p.add_argument("--quality-steps", type=int, help="override the quality mode's step count")
    args = p.parse_args()
    modes = None if args.quality_steps is None else {"quality": replace(MODES["quality"], steps=args.quality_steps)}
    if args.base:
        tf = Toonifier.from_files(
            args.base, args.toon or args.base, encoder_path=args.encoder, device=args.device, modes=modes
        )
    else:
        from gan.styles import get_style

        style = get_style(args.style)
        tf = Toonifier.from_files(
            style.base, style.toon, encoder_path=style.encoder, spec=style.blend, device=args.device, modes=modes
        )
    dev = torch.cuda.get_device_name() if tf.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# torch {torch.__version__}, {dev}; base {tf.base.resolution}px; modes {dict(MODES)}")
    mode_list = args.modes.split(",")
    stage_times(tf, [int(x) for x in args.faces.split(",")], mode_list)
    quality(tf, args.holdout, mode_list, args.plain_steps)


if __name__ == "__main__":
    main()
