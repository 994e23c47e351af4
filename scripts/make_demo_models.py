"""The exact, seeded recipe behind the shipped demo models in ``gan/demo_models/``.

1. A base StyleGAN2 (64 px, narrow) trained from scratch on procedural "photo" faces (``gan.synthetic``).
2. A "toon" model fine-tuned from it on 300 procedural toon faces (other people) with FreezeD and DiffAugment.
3. ``manifest.json``: files and their hashes, seeds, settings, the command line, timings, library versions.
4. Preview grids: the training data, base samples, toon samples and blends of the same latents.

    python scripts/make_demo_models.py                      # the shipped recipe (about an hour on a GPU-less
                                                            # 2-core machine per 5k base steps; see README)
    python scripts/make_demo_models.py --device cuda        # the same recipe on a GPU
    python scripts/make_demo_models.py --quick --out /tmp/demo   # smoke test: minutes, not a usable model

Long runs snapshot every ``--snapshot-every`` steps into ``--work`` and resume from there when restarted with
the same arguments. Results are bit-for-bit reproducible only on the same device type and thread count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from gan.blending import BlendSpec, blend  # noqa: E402
from gan.checkpoints import content_hash  # noqa: E402
from gan.encoder import save_encoder, train_encoder  # noqa: E402
from gan.images import save_grid, z_from_seeds  # noqa: E402
from gan.networks import Discriminator, Generator, GeneratorConfig  # noqa: E402
from gan.synthetic import make_dataset  # noqa: E402
from gan.training import TrainConfig, Trainer, lineage_of  # noqa: E402

RESOLUTION = 64
BASE_CONFIG = GeneratorConfig(
    resolution=RESOLUTION, w_dim=128, z_dim=128, n_mlp=4, channels={4: 64, 8: 64, 16: 64, 32: 32, 64: 16}
)
# NVIDIA's 'auto' settings for 64 px and batch 16: lr 0.0025, gamma 0.0002·res²/batch, EMA batch·10/32 kimg.
BASE_TRAIN = TrainConfig(
    batch=16, g_lr=0.0025, d_lr=0.0025, r1_gamma=0.05, ema_kimg=5.0, ema_rampup=0.05, xflip=True, seed=1
)
TOON_TRAIN = TrainConfig(
    batch=16,
    g_lr=0.002,
    d_lr=0.002,
    r1_gamma=0.05,
    ema_kimg=1.0,
    ema_rampup=None,
    xflip=True,
    seed=2,
    diffaugment="color,translation,cutout",
    freeze_d=2,
)
PHOTO_DATA = {"domain": "photo", "n": 6000, "size": RESOLUTION, "seed": 1000}
TOON_DATA = {"domain": "toon", "n": 300, "size": RESOLUTION, "seed": 2000}  # other people than the photos
STEPS_BASE, STEPS_TOON, STEPS_ENCODER = 4000, 400, 8000
ENCODER_SEED = 0
ENCODER_WIDTH = {"channels": 16, "max_channels": 128}  # 2.1 M parameters, 8 MB: "a few MB", and enough
DEMO_BLEND = {"mode": "swap", "resolution": 16, "structure_from": "toon"}  # 4-16 px from the toon model
PREVIEW_SEEDS = list(range(16))
QUICK = {"steps_base": 30, "steps_toon": 10, "n_photo": 256, "n_toon": 64}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def render_rows(base: Generator, toon: Generator, psi: float = 0.7) -> torch.Tensor:
    """Rows of the same latents: base, toon, and blends with toon structure up to 8, 16 and 32 px."""
    z = z_from_seeds(PREVIEW_SEEDS, base.z_dim).to(base.device)
    with torch.no_grad():
        ws = base.mapping(z, psi).unsqueeze(1).expand(-1, base.num_ws, -1)
        rows = [base.synthesis(ws), toon.synthesis(ws)]
        for swap in (8, 16, 32):
            rows.append(blend(base, toon, BlendSpec(mode="swap", resolution=swap)).synthesis(ws))
    return torch.cat(rows).cpu()


def samples(G: Generator, psi: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        return G(z_from_seeds(PREVIEW_SEEDS, G.z_dim).to(G.device), truncation_psi=psi).cpu()


def run_stage(name: str, trainer: Trainer, steps: int, args, previews: Path) -> float:
    """Train to ``steps`` with progress lines, preview grids and snapshots; returns seconds spent here."""
    snap = Path(args.work) / f"{name}.snapshot.pt"
    t0, last = time.perf_counter(), [time.perf_counter(), trainer.step_count]

    def progress(step: int, total: int, stats: dict) -> None:
        now = time.perf_counter()
        if step % args.log_every == 0 or step == total:
            rate = (step - last[1]) * trainer.cfg.batch / max(now - last[0], 1e-9)
            parts = " ".join(f"{k}={v:.3f}" for k, v in stats.items() if k != "ema_beta")
            print(f"[{name}] step {step}/{total} kimg {trainer.nimg / 1000:.1f} {rate:.1f} img/s {parts}", flush=True)
            last[:] = [now, step]
        if args.preview_every and (step % args.preview_every == 0 or step == total):
            save_grid(samples(trainer.G_ema), previews / f"{name}_step{step:06d}.png", columns=8)
        if args.snapshot_every and (step % args.snapshot_every == 0 or step == total):  # a rerun skips to export
            trainer.save_snapshot(snap)

    trainer.train(steps=steps, progress=progress)
    return time.perf_counter() - t0


def make_trainer(name: str, G: Generator, D: Discriminator, images, cfg: TrainConfig, meta: dict, args) -> Trainer:
    snap = Path(args.work) / f"{name}.snapshot.pt"
    if snap.exists() and not args.fresh:
        print(f"[{name}] resuming from {snap}", flush=True)
        return Trainer.resume(snap, images, device=args.device)
    return Trainer(G, D, images, cfg, meta=meta)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps-base", type=int, default=None, help=f"default {STEPS_BASE}")
    ap.add_argument("--steps-toon", type=int, default=None, help=f"default {STEPS_TOON}")
    ap.add_argument("--steps-encoder", type=int, default=None, help=f"default {STEPS_ENCODER}")
    ap.add_argument("--out", default=None, help="default gan/demo_models (build/demo_models_quick with --quick)")
    ap.add_argument("--work", default=str(ROOT / "build" / "demo_models"), help="snapshots (not shipped)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: few images and steps")
    ap.add_argument("--fresh", action="store_true", help="ignore snapshots in --work")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--preview-every", type=int, default=500, help="steps between progress grids (0: off)")
    ap.add_argument("--snapshot-every", type=int, default=500, help="steps between snapshots (0: off)")
    ap.add_argument("--encoder-only", action="store_true", help="retrain only the encoder of the models in --out")
    ap.add_argument(
        "--toon-only",
        action="store_true",
        help="re-fine-tune only the toon model of --out with gan.finetune (FreezeD + ADA, 16 kimg)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.toon_only:
        return retrain_toon(Path(args.out or ROOT / "gan" / "demo_models"), Path(args.work), argv)
    if args.encoder_only:
        out = Path(args.out or ROOT / "gan" / "demo_models")
        return retrain_encoder(out, args.steps_encoder or STEPS_ENCODER, argv)
    steps_base = args.steps_base or (QUICK["steps_base"] if args.quick else STEPS_BASE)
    steps_toon = args.steps_toon or (QUICK["steps_toon"] if args.quick else STEPS_TOON)
    steps_encoder = args.steps_encoder or (20 if args.quick else STEPS_ENCODER)
    photo_spec = {**PHOTO_DATA, "n": QUICK["n_photo"]} if args.quick else dict(PHOTO_DATA)
    toon_spec = {**TOON_DATA, "n": QUICK["n_toon"]} if args.quick else dict(TOON_DATA)
    out = Path(args.out or (ROOT / "build" / "demo_models_quick" if args.quick else ROOT / "gan" / "demo_models"))
    previews = out / "previews"
    previews.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = t_start = time.perf_counter()
    photos = make_dataset(photo_spec["n"], "photo", photo_spec["size"], seed=photo_spec["seed"])
    toons = make_dataset(toon_spec["n"], "toon", toon_spec["size"], seed=toon_spec["seed"])
    timings["render_datasets_s"] = time.perf_counter() - t
    for name, arr in (("data_photo", photos), ("data_toon", toons)):
        save_grid(torch.from_numpy(arr[:16]).permute(0, 3, 1, 2).float() / 127.5 - 1, previews / f"{name}.png", 8)

    # 1. Base model from scratch.
    torch.manual_seed(BASE_TRAIN.seed)
    G, D = Generator(BASE_CONFIG), Discriminator(resolution=RESOLUTION, channels=BASE_CONFIG.channels)
    meta = {"name": "demo-base", "ancestors": [], "dataset": {"generator": "gan.synthetic.make_dataset", **photo_spec}}
    trainer = make_trainer("base", G.to(args.device), D.to(args.device), photos, BASE_TRAIN, meta, args)
    timings["base_train_s"] = run_stage("base", trainer, steps_base, args, previews)
    timings["base_s_per_step"] = timings["base_train_s"] / max(1, steps_base)
    base_path = trainer.export(out / "base.safetensors")
    base, base_D = trainer.G_ema, trainer.D
    save_grid(samples(base), previews / "base_samples.png", columns=8)

    # 2. Toon model fine-tuned from the base (copies; the base stays as exported).
    Gt, Dt = Generator(BASE_CONFIG).to(args.device), Discriminator(resolution=RESOLUTION, channels=BASE_CONFIG.channels)
    Gt.load_state_dict(base.state_dict())
    Dt.load_state_dict(base_D.state_dict())
    meta = {
        "name": "demo-toon",
        "ancestors": lineage_of(base),
        "dataset": {"generator": "gan.synthetic.make_dataset", **toon_spec},
    }
    trainer = make_trainer("toon", Gt, Dt.to(args.device), toons, TOON_TRAIN, meta, args)
    timings["toon_train_s"] = run_stage("toon", trainer, steps_toon, args, previews)
    timings["toon_s_per_step"] = timings["toon_train_s"] / max(1, steps_toon)
    toon_path = trainer.export(out / "toon.safetensors")
    toon = trainer.G_ema
    save_grid(samples(toon), previews / "toon_samples.png", columns=8)
    save_grid(render_rows(base, toon), previews / "base_toon_blends.png", columns=len(PREVIEW_SEEDS))

    # 3. Encoder for the base model (self-supervised on its own samples).
    t = time.perf_counter()
    encoder = train_encoder(base, steps=steps_encoder, batch_size=8, seed=ENCODER_SEED, **ENCODER_WIDTH)
    encoder_path = save_encoder(encoder, out / "encoder.safetensors", base)
    timings["encoder_train_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    # 4. Manifest.
    command = "python scripts/make_demo_models.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    files = {
        p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        for p in [base_path, toon_path, Path(encoder_path), *sorted(previews.glob("*.png"))]
    }
    manifest = {
        # what gan.styles reads: the base model, its encoder, and named styles with their default blend
        "base": base_path.name,
        "encoder": Path(encoder_path).name,
        "default_style": "demo",
        "styles": {"demo": {"toon": toon_path.name, "blend": DEMO_BLEND}},
        "note": "Demo models trained on procedural faces (gan.synthetic); not real-face models. See README.",
        "command": command.strip(),
        "quick": args.quick,
        "models": {
            "base": {
                "file": base_path.name,
                "content_hash": content_hash(base.state_dict()),
                "generator": BASE_CONFIG.to_json(),
                "train": BASE_TRAIN.to_json(),
                "steps": steps_base,
                "dataset": photo_spec,
            },
            "toon": {
                "file": toon_path.name,
                "content_hash": content_hash(toon.state_dict()),
                "ancestors": lineage_of(base),
                "train": TOON_TRAIN.to_json(),
                "steps": steps_toon,
                "dataset": toon_spec,
            },
        },
        "files": files,
        "preview_seeds": PREVIEW_SEEDS,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "environment": {
            "device": args.device,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for k, v in timings.items():
        print(f"{k}: {v:.3f}", flush=True)
    print(f"wrote {base_path}, {toon_path}, {out / 'manifest.json'}, previews in {previews}", flush=True)
    return 0


TOON_FINETUNE = ["--kimg", "16", "--snapshot-kimg", "4", "--no-align", "--seed", "2"]  # FreezeD 2 + ADA defaults


def retrain_toon(out: Path, work: Path, argv: list[str] | None) -> int:
    """Fine-tune a new toon model from the base in ``out`` on the 300 procedural toons (TOON_DATA) with
    ``toonify finetune`` (FreezeD 2, ADA, 16 kimg at batch 8) and ship it with fresh previews. A finished
    run in ``work/toon_run`` is resumed (nothing left to train) rather than repeated."""
    from PIL import Image

    from gan.checkpoints import load_generator
    from gan.cli import main as toonify

    manifest = json.loads((out / "manifest.json").read_text())
    data_dir, run_dir = work / "toon_data", work / "toon_run"
    if not data_dir.is_dir():
        data_dir.mkdir(parents=True)
        for i, arr in enumerate(make_dataset(TOON_DATA["n"], "toon", TOON_DATA["size"], seed=TOON_DATA["seed"])):
            Image.fromarray(arr).save(data_dir / f"{i:03d}.png")
    t = time.perf_counter()
    resume = ["--resume"] if (run_dir / "settings.json").is_file() else []
    cmd = ["finetune", str(out / manifest["base"]), str(data_dir), "--out", str(run_dir), *TOON_FINETUNE, *resume]
    if toonify(cmd) != 0:
        return 1
    toon_path = out / manifest["styles"]["demo"]["toon"]
    toon_path.write_bytes((run_dir / "toon.safetensors").read_bytes())
    base, toon = load_generator(out / manifest["base"]), load_generator(toon_path)
    previews = out / "previews"
    save_grid(samples(toon), previews / "toon_samples.png", columns=8)
    save_grid(render_rows(base, toon), previews / "base_toon_blends.png", columns=len(PREVIEW_SEEDS))
    for p in [toon_path, previews / "toon_samples.png", previews / "base_toon_blends.png"]:
        manifest["files"][p.name] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
    report = json.loads((run_dir / "report.json").read_text())
    manifest["models"]["toon"] = {
        "file": toon_path.name,
        "content_hash": content_hash(toon.state_dict()),
        "ancestors": lineage_of(base),
        "finetune": ["toonify", *cmd[:1], "BASE", "DATA", *TOON_FINETUNE],
        "dataset": TOON_DATA,
        "metrics": report.get("metrics"),
    }
    manifest["toon_command"] = "python scripts/make_demo_models.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    manifest["timings"]["toon_train_s"] = round(time.perf_counter() - t, 3)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"wrote {toon_path}, previews and {out / 'manifest.json'}", flush=True)
    return 0


def retrain_encoder(out: Path, steps: int, argv: list[str] | None) -> int:
    """Train a new encoder for the base model in ``out`` and record it in its manifest (base and toon untouched)."""
    from gan.checkpoints import load_generator

    manifest = json.loads((out / "manifest.json").read_text())
    base = load_generator(out / manifest["base"])
    t = time.perf_counter()
    every = max(1, steps // 20)
    encoder = train_encoder(
        base,
        steps=steps,
        batch_size=8,
        seed=ENCODER_SEED,
        **ENCODER_WIDTH,
        progress=lambda i, n, loss: i % every == 0 and print(f"encoder {i}/{n} loss {loss:.4f}"),
    )
    path = save_encoder(encoder, out / manifest["encoder"], base)
    manifest["timings"]["encoder_train_s"] = round(time.perf_counter() - t, 3)
    manifest["files"][path.name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    manifest["encoder_command"] = "python scripts/make_demo_models.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    manifest["models"]["encoder"] = {"file": path.name, "steps": steps, "seed": ENCODER_SEED, **ENCODER_WIDTH}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path} and {out / 'manifest.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
