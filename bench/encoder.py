"""The image→W+ encoder: how well it inverts its base model, what each mode keeps of a real face, and what a
training step of ``toonify train-encoder`` costs at real model sizes.

    python bench/encoder.py                                # demo models + 256/1024 px config-f steps, CPU
    python bench/encoder.py --device cpu,cuda --json out.json
    python bench/encoder.py --models-dir DIR --style NAME  # another manifest's base model and encoder
    python bench/encoder.py --quick --json out.json        # toy sizes and counts: the same code paths, fast

Sections (a table each, and everything in ``--json``):

* **report**: ``gan.encoder.encoder_report`` for the style's base model and encoder (default: the demo's):
  ``--holdout`` generated faces the encoder's training never drew (``sample_training_ws`` with its truncation
  range, seed ``gan.encoder.HOLDOUT_SEED``), rendered with random noise, against encoder -> G at const noise;
  and the real portraits in tests/fixtures aligned to G's resolution (FFHQ crop, ``gan.align``). PSNR, the
  D-feature distance (the feature term of ``DiscriminatorFeatureLoss`` alone, on the base checkpoint's
  discriminator, as bench/distill.py measures) and for the portraits the dlib descriptor distance
  (``gan.encoder.identity_scores``): ``identity`` where dlib detects a face in both photo and reconstruction
  (bench/distill.py's measure), ``id_photo_box`` with the reconstruction's descriptor taken in the photo's face
  box (always defined: the reconstruction is pixel-aligned to the photo). < 0.6 is dlib's "same person".
* **modes**: the same portraits through ``Toonifier.project(crops, mode)`` for fast, balanced and quality,
  rendered by the base model (const noise): PSNR, D-feature, identity as above, seconds per face.
* **train**: seconds per ``gan.encoder.train_encoder`` step on 256 and 1024 px config-f generators with random
  weights (``bench/gpu.py``'s ``networks``), per device, as ``toonify train-encoder --real-faces`` runs it: the
  default encoder width, batch 2, a ``--real-share`` 0.25 of real faces (random pixels: values do not change
  cost) with image loss only, the perceptual loss ``build_perceptual_loss`` picks (LPIPS where configured, else
  the discriminator's features), bf16 autocast on CUDA. One warm-up step, then the mean of the timed steps (an
  even count: at batch 2 every other batch holds a real face, which skips one render). Peak memory on CUDA.

Nothing is asserted; tests/test_bench_encoder.py runs ``--quick`` and checks the rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # the repository, not bench/, on the path

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import gpu as bench_gpu  # noqa: E402
from gan.checkpoints import CheckpointError, load_discriminator  # noqa: E402
from gan.encoder import (  # noqa: E402
    RealFaces,
    d_feature_metric,
    default_portraits,
    encoder_report,
    identity_scores,
    train_encoder,
    training_image_size,
)
from gan.imageio import load_image  # noqa: E402
from gan.images import psnr  # noqa: E402
from gan.perceptual import build_perceptual_loss  # noqa: E402
from gan.pipeline import Toonifier, to_tensor  # noqa: E402
from gan.styles import read_manifest  # noqa: E402

MODES = ("fast", "balanced", "quality")


@dataclass(frozen=True)
class Plan:
    holdout: int = 32  # held-out generated faces in the report
    max_mode_steps: int | None = None  # cap on the balanced/quality projection steps (None: the modes' own)
    train_resolutions: tuple[int, ...] = (256, 1024)
    train_batch: int = 2
    warmup_steps: int = 1
    timed_steps: int = 2  # on CPU (keep it even: batches alternate with and without a real face)
    timed_steps_cuda: int = 10
    real_share: float = 0.25  # train-encoder's default
    real_faces: int = 16  # random real faces to draw from
    networks: bench_gpu.Plan = field(default_factory=bench_gpu.Plan)  # config-f: multiplier 2, 512 max
    encoder_width: dict = field(default_factory=dict)  # overrides of train_encoder's width (channels 32, max 256)


QUICK = Plan(
    holdout=2,
    max_mode_steps=3,
    train_resolutions=(16, 32),
    timed_steps_cuda=2,
    real_faces=4,
    networks=bench_gpu.QUICK,
    encoder_width={"channels": 8, "max_channels": 16},
)


def expected_rows(plan: Plan, devices: list[str]) -> list[tuple]:
    """Every row key a run produces (the test checks the JSON has each)."""
    rows: list[tuple] = [("report", "generated"), ("report", "real")]
    rows += [("modes", m) for m in MODES]
    rows += [("train", r, d) for r in plan.train_resolutions for d in devices]
    return rows


def row_key(row: dict) -> tuple:
    if row["section"] == "report":
        return ("report", row["set"])
    if row["section"] == "modes":
        return ("modes", row["mode"])
    return ("train", row["res"], row["device"])


# ----------------------------------------------------------------------------------------------------------
# Sections


def bench_report(tf: Toonifier, metric: torch.nn.Module | None, plan: Plan) -> tuple[list[dict], dict]:
    report = encoder_report(tf.encoder, tf.base, holdout=plan.holdout, metric=metric, aligner=tf.aligner, quiet=True)
    gen, real = report["generated"], report["real"]
    rows = [
        {"section": "report", "set": "generated", **{k: gen[k] for k in ("faces", "psnr", "psnr_min", "dfeat",
                                                                         "dfeat_max", "latent_mse")}},
        {"section": "report", "set": "real", "faces": real["faces"], "aligned": real["aligned"],
         **{k: real.get(k) for k in ("psnr", "psnr_min", "dfeat", "dfeat_max", "identity", "readable")},
         "id_photo_box": real.get("identity_photo_box"), "note": real.get("note") or real.get("identity_note")},
    ]  # fmt: skip
    for row in rows:
        print_row(row)
    return rows, report


def aligned_portraits(tf: Toonifier) -> torch.Tensor:
    """The largest face of each portrait in tests/fixtures, aligned by the Toonifier at the base resolution."""
    crops = [tf.align(load_image(path), all_faces=False)[0].image for path in default_portraits()]
    return to_tensor(crops, tf.device)


def bench_modes(tf: Toonifier, metric: torch.nn.Module | None, plan: Plan) -> list[dict]:
    crops = aligned_portraits(tf)
    rows = []
    for mode in MODES:
        settings = tf.modes[mode]
        steps = settings.steps if plan.max_mode_steps is None else min(settings.steps, plan.max_mode_steps)
        tf.modes[mode] = replace(settings, steps=steps)
        try:
            t0 = time.perf_counter()
            latents, _ = tf.project(crops, mode, seeds=list(range(len(crops))))
            bench_gpu.sync(tf.device)
            seconds = time.perf_counter() - t0
        finally:
            tf.modes[mode] = settings
        with torch.no_grad():
            recon = tf.base.synthesis(latents, noise_mode="const")
            dfeat = None if metric is None else metric(recon, crops).mean().item()
        ident = identity_scores(crops, recon)
        rows.append({"section": "modes", "mode": mode, "steps": steps, "faces": len(crops),
                     "psnr": psnr(recon, crops).mean().item(), "dfeat": dfeat, "identity": ident["identity"],
                     "readable": ident.get("readable"), "id_photo_box": ident["identity_photo_box"],
                     "s_per_face": seconds / len(crops), "note": ident.get("identity_note")})  # fmt: skip
        print_row(rows[-1])
    return rows


def train_row(res: int, device: torch.device, plan: Plan) -> dict:
    """Seconds per train_encoder step (mean of the timed steps after the warm-up) on config-f networks."""
    G, D = bench_gpu.networks(res, plan.networks, device)
    loss = build_perceptual_loss(discriminator=D).to(device)
    size = training_image_size(res)
    pixels = np.random.default_rng(0).integers(0, 256, (plan.real_faces, size, size, 3), dtype=np.uint8)
    real = RealFaces.from_array(pixels, source="random pixels")
    timed = plan.timed_steps_cuda if device.type == "cuda" else plan.timed_steps
    stamps: list[float] = []

    def progress(step: int, steps: int, loss_value: float) -> None:
        bench_gpu.sync(device)
        stamps.append(time.perf_counter())

    enc = train_encoder(G, steps=plan.warmup_steps + timed, batch_size=plan.train_batch, fit_samples=0, loss_fn=loss,
                        real_faces=real, real_share=plan.real_share, progress=progress,
                        **plan.encoder_width)  # fmt: skip
    step_s = float(np.mean(np.diff(stamps)[plan.warmup_steps - 1 :]))
    return {"steps": timed, "s_per_step": step_s, "img_s": plan.train_batch / step_s, "loss": loss.name,
            "encoder_input": enc.input_size, "image_loss_px": min(res, 256), "real_px": size,
            "encoder_params": sum(p.numel() for p in enc.parameters()), "bf16": enc.train_settings["bf16"],
            "final_loss": enc.train_settings["final_loss"]}  # fmt: skip


def bench_train(plan: Plan, device: torch.device) -> list[dict]:
    rows = []
    for res in plan.train_resolutions:
        base = {"section": "train", "model": "config-f", "res": res, "device": device.type, "batch": plan.train_batch,
                "real_share": plan.real_share}  # fmt: skip
        rows.append(bench_gpu.guarded(device, base, lambda res=res: train_row(res, device, plan)))
        print_row(rows[-1])
    return rows


# ----------------------------------------------------------------------------------------------------------
# Output


COLUMNS = {
    "report": ("set", "faces", "aligned", "psnr", "psnr_min", "dfeat", "dfeat_max", "latent_mse", "identity",
               "readable", "id_photo_box"),
    "modes": ("mode", "steps", "faces", "psnr", "dfeat", "identity", "readable", "id_photo_box", "s_per_face"),
    "train": ("model", "res", "device", "batch", "real_share", "loss", "steps", "s_per_step", "img_s", "peak_gib"),
}  # fmt: skip
TITLES = {
    "report": "report: encoder -> G reconstruction (PSNR dB higher; D-feature, dlib identity lower, < 0.6 same person)",
    "modes": "identity per mode: aligned real portraits -> Toonifier.project -> base model",
    "train": "train step: train_encoder on config-f random-weight generators",
}
_printed: set[str] = set()


def print_row(row: dict) -> None:
    bench_gpu.print_section_row(row, COLUMNS, TITLES, _printed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", help="folder with manifest.json (default: $TOONIFY_MODELS_DIR or the demo)")
    p.add_argument("--style", help="style whose base model and encoder to measure (default: the manifest's)")
    p.add_argument("--device", default="cpu,cuda" if torch.cuda.is_available() else "cpu",
                   help="comma-separated devices for the train rows; report and modes run on the last one")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="toy sizes and counts: the same code paths, fast")
    p.add_argument("--holdout", type=int, help="held-out generated faces (default 32; quick: 2)")
    p.add_argument("--only", default="report,modes,train", help="comma-separated subset of report,modes,train")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", help="write every row (and the full report) here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else Plan()
    if args.holdout is not None:
        plan = replace(plan, holdout=args.holdout)
    devices = [torch.device(d.strip()) for d in args.device.split(",") if d.strip()]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if only - {"report", "modes", "train"}:
        p.error(f"unknown sections {sorted(only - {'report', 'modes', 'train'})}")
    main_device = devices[-1]
    names = bench_gpu.device_names(devices)
    print(f"# bench/encoder.py{' --quick' if args.quick else ''}: torch {torch.__version__}, {'; '.join(names)}")
    started = time.perf_counter()
    rows: list[dict] = []
    report = None
    style = read_manifest(Path(args.models_dir) if args.models_dir else None).style(args.style)
    if only & {"report", "modes"}:
        if style.encoder is None:
            p.error(f"style {style.name!r} has no encoder in its manifest")
        tf = Toonifier.from_files(style.base, style.toon, encoder_path=style.encoder, spec=style.blend,
                                  device=str(main_device))  # fmt: skip
        try:
            metric = d_feature_metric(load_discriminator(style.base, main_device)).to(main_device)
        except CheckpointError:
            metric = None  # a base file without a discriminator: PSNR and identity only
        print(f"# style {style.name}: base {style.base.name}, encoder {style.encoder.name}, "
              f"{tf.base.resolution} px; projection loss {tf.loss_fn.name}; portraits: "
              f"{', '.join(p.name for p in default_portraits()) or 'none'}")  # fmt: skip
        if "report" in only:
            report_rows, report = bench_report(tf, metric, plan)
            rows += report_rows
        if "modes" in only:
            rows += bench_modes(tf, metric, plan)
    if "train" in only:
        for device in devices:
            rows += bench_train(plan, device)
    meta = bench_gpu.run_meta(args, names, plan, started, style=style.name)
    bench_gpu.finish(meta, {"rows": rows, "report": report}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
