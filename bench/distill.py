"""Instant toons (issue 13): the distilled student against balanced projection, for quality and speed.

    python bench/distill.py                                # demo style + 256 px config-f rows, CPU
    python bench/distill.py --device cpu,cuda --json out.json
    python bench/distill.py --quick --json out.json        # toy counts: the same code paths in about a minute

Sections (a table for each, and everything in ``--json``):

* **quality**: held-out latents (W+ drawn as the student's training draws them, ``sample_training_ws`` with
  its truncation range and mixing share, from a generator seed its training does not use), each rendered by
  the base model (the input) and by the blended teacher (the target), constant noise. Paths from the input:
  the student; balanced projection (``Toonifier.project(input, "balanced")``, then the blended model renders
  the latents); fast (encoder only, for reference). Distance to the teacher's output: PSNR, and the D-feature
  distance: the feature term of ``gan.perceptual.DiscriminatorFeatureLoss`` alone (the base checkpoint's
  discriminator features, unit-normalised over channels, squared distance summed over channels, averaged over
  positions and blocks).
* **identity**: dlib face-descriptor distance (``gan.finetune.IdentityMeter``: < 0.6 is dlib's "same
  person") between each aligned input and its toon, per path, on three sets: the real portraits in
  tests/fixtures (aligned by the Toonifier's aligner), procedural photos (``gan.synthetic``, people the demo
  base was not trained on) and the held-out base renders above. Faces dlib cannot read are counted.
* **speed**: faces/s from aligned crop to toon crop (alignment and paste-back cost the same on both paths)
  at batch 1 and 32, per device. Student: ``gan.distill.run_student``, median of repeats after a warm-up.
  Balanced: encoder + 40 refine steps + the blended render; at 256 px only the first steps are timed and the
  rest extrapolated from the median step (the row says how many), as ``bench/gpu.py`` does. Projection keeps
  a graph per face, so a batch is projected in passes as the worker sends them: at most 16 faces
  (``--pass-faces``) and no more than free memory holds (``gan.projection.faces_per_pass``; on CPU the host's
  MemAvailable); the row's cost per face is that of one full pass (``pass_faces``, ``passes``). Models: the demo
  style, and 256 px config-f networks with random weights (``bench/gpu.py``'s ``networks``) beside a student
  of the size ``toonify distill`` makes (``DistillConfig``) for 256 px (speed only: values do not change cost).

Quality and identity run on the last ``--device``; a student comes from ``--student``, else the manifest's
entry for the style's blend, else one is trained for a few kimg on the spot (with a warning: its numbers say
nothing about a real student).

The summary prints the issue's two acceptance figures: the student's distance to the teacher against
balanced projection's (PSNR difference, D-feature ratio) and the CPU speed-up per face. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # the repository, not bench/, on the path

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import Tensor  # noqa: E402

from bench import gpu as bench_gpu  # noqa: E402
from gan.blending import BlendSpec, LineageWarning  # noqa: E402
from gan.checkpoints import load_discriminator  # noqa: E402
from gan.distill import DistillConfig, Student, load_student, run_student, student_lineage, train_student  # noqa: E402
from gan.encoder import Encoder, sample_training_ws  # noqa: E402
from gan.images import from_uint8, psnr, to_uint8  # noqa: E402
from gan.networks import Generator  # noqa: E402
from gan.perceptual import DiscriminatorFeatureLoss, build_perceptual_loss  # noqa: E402
from gan.pipeline import MODES, Toonifier, to_tensor  # noqa: E402
from gan.projection import faces_per_pass  # noqa: E402
from gan.styles import Style, get_style  # noqa: E402
from gan.synthetic import make_dataset  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
PORTRAITS = ("astronaut.png",)  # the real portraits in tests/fixtures (see its README)
HOLDOUT_SEED = 90_210  # training draws from torch.Generator().manual_seed(DistillConfig.seed), 0 by default
PROCEDURAL_SEED = 424_242  # gan.synthetic people: the demo base was trained on seed 1000's
PATHS = ("student", "balanced", "fast")  # fast (encoder only) is there for reference


@dataclass(frozen=True)
class Plan:
    holdout: int = 32  # held-out latents for the quality and generated-identity rows
    procedural: int = 32  # gan.synthetic photos for the identity rows
    batches: tuple[int, ...] = (1, 32)
    student_repeats: int = 5  # timed student calls per speed row (median)
    demo_timed_steps: int = 40  # balanced steps timed on the demo models (40: all, nothing extrapolated)
    cf_timed_steps: int = 3  # balanced steps timed on the config-f networks (the rest extrapolated)
    cf_resolution: int = 256
    cf_networks: bench_gpu.Plan = field(default_factory=bench_gpu.Plan)  # config-f: multiplier 2, 512 max
    cf_student: dict = field(default_factory=dict)  # overrides of the size `toonify distill` makes (DistillConfig)
    pass_faces: int = 16  # faces per projection pass at most: backend.batching's default max_faces
    train_kimg: float = 2.0  # a student trained on the fly when none is given or listed (with a warning)


QUICK = Plan(
    holdout=2,
    procedural=2,
    batches=(1, 4),
    student_repeats=2,
    demo_timed_steps=3,
    cf_timed_steps=2,
    cf_resolution=32,
    cf_networks=bench_gpu.QUICK,
    cf_student={"channels": 8, "max_channels": 32},
    train_kimg=0.02,
)


def expected_rows(plan: Plan, devices: list[str]) -> list[tuple]:
    """Every row key a run produces (the test checks the JSON has each)."""
    rows: list[tuple] = [("quality", p) for p in PATHS]
    rows += [("identity", s, p) for s in ("real", "procedural", "generated") for p in PATHS]
    rows += [
        ("speed", m, d, p, b) for m in ("demo", "config-f") for d in devices for p in PATHS[:2] for b in plan.batches
    ]
    return rows


def row_key(row: dict) -> tuple:
    if row["section"] == "quality":
        return ("quality", row["path"])
    if row["section"] == "identity":
        return ("identity", row["set"], row["path"])
    return ("speed", row["model"], row["device"], row["path"], row["batch"])


# ----------------------------------------------------------------------------------------------------------
# Inputs


def holdout_latents(G: Generator, n: int, training: dict | None = None, seed: int = HOLDOUT_SEED) -> Tensor:
    """W+ latents drawn as the student's training draws them (``gan.encoder.sample_training_ws`` with its
    truncation range and mixing share), from a generator seed its training does not use."""
    config = DistillConfig.from_json(training or {})
    if config.seed == seed:
        warnings.warn(f"the student was trained with seed {seed}: the holdout is not held out", stacklevel=2)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return sample_training_ws(G, n, config.truncation, g, mixing=config.mixing)


def real_portraits(tf: Toonifier) -> Tensor:
    """The largest face of each portrait in tests/fixtures, aligned by the Toonifier at the base resolution."""
    crops = [tf.align(Image.open(FIXTURES / name).convert("RGB"), all_faces=False)[0].image for name in PORTRAITS]
    return to_tensor(crops, tf.device)


def d_feature_metric(base_path: Path, device: torch.device) -> DiscriminatorFeatureLoss:
    """The feature term of DiscriminatorFeatureLoss alone (pixel and multi-scale weights 0)."""
    D = load_discriminator(base_path, device)
    return DiscriminatorFeatureLoss(D, feature_weight=1.0, pixel_weight=0.0, multiscale_weight=0.0).to(device)


# ----------------------------------------------------------------------------------------------------------
# The three paths from aligned crops to toon crops


def free_bytes(device: torch.device) -> int | None:
    """Free memory for a projection pass: the GPU's, or the host's MemAvailable (Linux) on CPU; None unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    lines = meminfo.read_text().splitlines() if meminfo.exists() else []
    return next((int(ln.split()[1]) * 1024 for ln in lines if ln.startswith("MemAvailable:")), None)


def pass_size(tf: Toonifier, batch: int, plan: Plan) -> int:
    """Faces in one balanced projection pass, as the worker sends them: at most ``plan.pass_faces`` and no more
    than the free memory holds (``gan.projection.faces_per_pass``)."""
    free, cap = free_bytes(tf.device), plan.pass_faces
    if free is not None:
        cap = faces_per_pass(free, tf.base.config, steps=MODES["balanced"].steps, max_faces=cap)
    return min(batch, cap)


def render_latents(G: Generator, latents: Tensor) -> Tensor:
    with torch.no_grad():
        return G.synthesis(latents, noise_mode="const")


def toons(tf: Toonifier, student: Student, crops: Tensor, *, seed0: int = 0) -> dict[str, Tensor]:
    blended = tf.blended()
    seeds = list(range(seed0, seed0 + len(crops)))
    balanced, _ = tf.project(crops, "balanced", seeds=seeds)
    fast, _ = tf.project(crops, "fast")
    return {
        "student": run_student(student, crops).to(crops.device),
        "balanced": render_latents(blended, balanced),
        "fast": render_latents(blended, fast),
    }


# ----------------------------------------------------------------------------------------------------------
# Sections


def bench_quality(
    tf: Toonifier, student: Student, metric: DiscriminatorFeatureLoss, plan: Plan
) -> tuple[list[dict], Tensor, dict[str, Tensor]]:
    ws = holdout_latents(tf.base, plan.holdout, student.meta.get("training")).to(tf.device)
    inputs, targets = render_latents(tf.base, ws), render_latents(tf.blended(), ws)
    outputs = toons(tf, student, inputs)
    rows = []
    with torch.no_grad():
        for path, out in outputs.items():
            db, dfeat = psnr(out, targets), metric(out, targets)
            rows.append({"section": "quality", "path": path, "faces": len(out), "psnr": db.mean().item(),
                         "psnr_min": db.min().item(), "dfeat": dfeat.mean().item(),
                         "dfeat_max": dfeat.max().item()})  # fmt: skip
            print_row(rows[-1])
    return rows, inputs, outputs


def bench_identity(
    tf: Toonifier, student: Student, plan: Plan, generated: tuple[Tensor, dict[str, Tensor]]
) -> list[dict]:
    from gan.finetune import IdentityMeter

    meter, why = IdentityMeter.maybe()
    sets: dict[str, Callable[[], tuple[Tensor, dict[str, Tensor]]]] = {
        "real": lambda: _with_toons(tf, student, real_portraits(tf)),
        "procedural": lambda: _with_toons(
            tf, student, from_uint8(make_dataset(plan.procedural, "photo", tf.base.resolution, PROCEDURAL_SEED))
        ),
        "generated": lambda: generated,
    }
    rows = []
    for name, make in sets.items():
        if meter is None:
            rows += [{"section": "identity", "set": name, "path": p, "note": why} for p in PATHS]
            for row in rows[-len(PATHS) :]:
                print_row(row)
            continue
        inputs, outputs = make()
        reference = meter.descriptors(to_uint8(inputs))
        for path in PATHS:
            compared = meter.compare(reference, meter.descriptors(to_uint8(outputs[path])))
            rows.append({"section": "identity", "set": name, "path": path, "faces": len(inputs),
                         "inputs_readable": sum(d is not None for d in reference), **compared})  # fmt: skip
            print_row(rows[-1])
    return rows


def _with_toons(tf: Toonifier, student: Student, crops: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    crops = crops.to(tf.device)
    return crops, toons(tf, student, crops, seed0=10_000)


def bench_speed(
    model: str, tf: Toonifier, student: Student, crops_for: Callable[[int], Tensor], timed_steps: int,
    plan: Plan,
) -> list[dict]:  # fmt: skip
    """Student and balanced rows at each batch for one model on one device (``tf.device``)."""
    device = tf.device
    rows = []
    steps = MODES["balanced"].steps
    settings = tf.modes["balanced"]
    for batch in plan.batches:
        crops = crops_for(batch).to(device)
        base = {"section": "speed", "model": model, "res": tf.base.resolution, "device": device.type, "batch": batch}

        def student_call(crops: Tensor = crops, batch: int = batch) -> None:
            run_student(student, crops, batch_size=batch)

        s = bench_gpu.timed(student_call, device, plan.student_repeats)
        rows.append({**base, "path": "student", "s_per_face": s / batch, "faces_s": batch / s})
        print_row(rows[-1])

        pass_faces = pass_size(tf, batch, plan)  # projection keeps a graph per face: big batches go in passes
        tf.modes["balanced"] = replace(settings, steps=min(steps, timed_steps))
        try:
            tf.project(crops[:1], "balanced", seeds=[0])  # warm-up (kernels, allocator) outside the row
            projected = bench_gpu.project_row(tf, "balanced", crops[:pass_faces], steps, device)
        finally:
            tf.modes["balanced"] = settings
        latents = torch.randn(batch, tf.base.num_ws, tf.base.w_dim, device=device)
        blended = tf.blended()
        render_s = bench_gpu.timed(lambda blended=blended, latents=latents: render_latents(blended, latents), device, 1)
        per_face = projected["s_per_face"] + render_s / batch
        rows.append({**base, "path": "balanced", "s_per_face": per_face, "faces_s": 1 / per_face, "steps": steps,
                     "timed_steps": projected["timed_steps"], "extrapolated_steps": projected["extrapolated_steps"],
                     "pass_faces": pass_faces, "passes": math.ceil(batch / pass_faces),
                     "render_s_per_face": render_s / batch})  # fmt: skip
        print_row(rows[-1])
    return rows


def demo_speed(tf: Toonifier, student: Student, plan: Plan) -> list[dict]:
    def crops_for(batch: int) -> Tensor:  # base renders of held-out latents: face-like inputs
        return render_latents(tf.base, holdout_latents(tf.base, batch, student.meta.get("training")).to(tf.device))

    return bench_speed("demo", tf, student, crops_for, plan.demo_timed_steps, plan)


def cf_student_kwargs(plan: Plan) -> dict:
    """The student `toonify distill` would make for a config-f model (DistillConfig's size), with overrides."""
    return DistillConfig().student_kwargs(plan.cf_resolution) | plan.cf_student


def config_f_speed(plan: Plan, device: torch.device) -> list[dict]:
    """Random-weight config-f networks at ``plan.cf_resolution`` (as bench/gpu.py builds them) and a student."""
    res = plan.cf_resolution
    G, D = bench_gpu.networks(res, plan.cf_networks, device)
    torch.manual_seed(1)
    enc = Encoder(res, G.num_ws, G.w_dim).to(device)
    with torch.no_grad():
        enc.w_avg.copy_(G.w_avg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LineageWarning)  # G blended with itself: a random model has no lineage
        tf = Toonifier(G, G, encoder=enc, loss_fn=build_perceptual_loss(discriminator=D).to(device), device=device)
        tf.blended()
    student = Student(**cf_student_kwargs(plan)).to(device).eval()

    def crops_for(batch: int) -> Tensor:
        return torch.rand(batch, 3, res, res, generator=torch.Generator().manual_seed(batch)) * 2 - 1

    return bench_speed("config-f", tf, student, crops_for, plan.cf_timed_steps, plan)


# ----------------------------------------------------------------------------------------------------------
# The student


def load_or_train_student(
    style: Style, tf: Toonifier, spec: BlendSpec, path: str | None, plan: Plan
) -> tuple[Student, dict]:
    """``--student PATH``, else the style's student for its blend in the manifest, else a tiny one trained now."""
    lineage = student_lineage(tf.base, tf.toon, spec)
    if path is None:
        entry = style.student_for(spec)
        path = None if entry is None else str(entry.file)
        source = "manifest"
    else:
        source = "--student"
    if path is not None:
        student = load_student(path, lineage=lineage, device=tf.device)
        return student, {"source": source, "path": path, "meta": student.meta}
    warnings.warn(
        f"no student for {spec.describe()} in the manifest and no --student: training a tiny one "
        f"({plan.train_kimg} kimg); its numbers say nothing about a real student",
        stacklevel=2,
    )
    t0 = time.perf_counter()
    student = train_student(tf.base, tf.toon, spec, DistillConfig(kimg=plan.train_kimg))
    student = student.to(tf.device).eval()
    return student, {"source": f"trained on the fly ({plan.train_kimg} kimg, {time.perf_counter() - t0:.0f} s)",
                     "path": None, "meta": student.meta}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Output


COLUMNS = {
    "quality": ("path", "faces", "psnr", "psnr_min", "dfeat", "dfeat_max"),
    "identity": ("set", "path", "faces", "inputs_readable", "readable", "distance", "same_person"),
    "speed": ("model", "res", "device", "path", "batch", "faces_s", "s_per_face", "pass_faces", "timed_steps", "steps"),
}
TITLES = {
    "quality": "quality: distance to the teacher's render on held-out latents (PSNR dB higher, D-feature lower)",
    "identity": "identity: dlib descriptor distance, aligned input vs toon (< 0.6: same person)",
    "speed": "speed: aligned crop -> toon crop",
}
_printed: set[str] = set()


def print_row(row: dict) -> None:
    bench_gpu.print_section_row(row, COLUMNS, TITLES, _printed)


def summarise(rows: list[dict]) -> dict:
    """The issue's acceptance figures: closeness to the teacher vs balanced, and the per-face speed-up."""
    quality = {r["path"]: r for r in rows if r["section"] == "quality"}
    student, balanced = quality["student"], quality["balanced"]
    speed = {row_key(r)[1:]: r for r in rows if r["section"] == "speed"}
    speedups = {}
    for (model, device, path, batch), r in speed.items():
        if path == "student":
            speedups[f"{model} {device} batch {batch}"] = (
                r["faces_s"] / speed[(model, device, "balanced", batch)]["faces_s"]
            )
    cpu_demo = [v for k, v in speedups.items() if k.startswith("demo cpu ")]
    return {
        "psnr_student_minus_balanced_db": student["psnr"] - balanced["psnr"],
        "dfeat_student_over_balanced": student["dfeat"] / balanced["dfeat"],
        "student_at_least_as_close": student["psnr"] >= balanced["psnr"] and student["dfeat"] <= balanced["dfeat"],
        "speedup_per_face": speedups,
        "cpu_demo_min_speedup": min(cpu_demo) if cpu_demo else None,
        "cpu_at_least_20x": min(cpu_demo) >= 20 if cpu_demo else None,
    }


def print_summary(summary: dict) -> None:
    print("\n## acceptance (issue 13)")
    print(f"PSNR to the teacher, student - balanced: {summary['psnr_student_minus_balanced_db']:+.2f} dB")
    print(f"D-feature distance to the teacher, student / balanced: {summary['dfeat_student_over_balanced']:.3f}")
    print(f"student at least as close as balanced (both measures): {_yes(summary['student_at_least_as_close'])}")
    for name, ratio in summary["speedup_per_face"].items():
        print(f"speed-up per face, student / balanced, {name}: {ratio:.1f}x")
    print(f"CPU speed-up >= 20x on the demo style (both batches): {_yes(summary['cpu_at_least_20x'])}")


def _yes(v: bool | None) -> str:
    return "not measured" if v is None else "yes" if v else "NO"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--style", help="style in the manifest (default: the manifest's default, the demo style)")
    p.add_argument("--student", help="student checkpoint (default: the style's student for its blend)")
    p.add_argument("--device", default="cpu,cuda" if torch.cuda.is_available() else "cpu",
                   help="comma-separated devices for the speed rows; quality runs on the last one")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="toy counts and sizes: the same code paths, fast")
    p.add_argument("--holdout", type=int, help="held-out latents (default 32; quick: 2)")
    p.add_argument("--pass-faces", type=int, help="faces per projection pass at most (default 16, as the worker)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", help="write every row and the summary here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else Plan()
    if args.holdout is not None:
        plan = replace(plan, holdout=args.holdout)
    if args.pass_faces is not None:
        plan = replace(plan, pass_faces=args.pass_faces)
    devices = [torch.device(d.strip()) for d in args.device.split(",") if d.strip()]
    main_device = devices[-1]

    style = get_style(args.style)
    names = bench_gpu.device_names(devices)
    print(f"# bench/distill.py{' --quick' if args.quick else ''}: torch {torch.__version__}, {'; '.join(names)}")
    started = time.perf_counter()
    tfs = {
        d: Toonifier.from_files(style.base, style.toon, encoder_path=style.encoder, spec=style.blend, device=str(d))
        for d in devices
    }
    tf = tfs[main_device]
    student, student_info = load_or_train_student(style, tf, style.blend, args.student, plan)
    where = f" {student_info['path']}" if student_info["path"] else ""
    print(f"# style {style.name} ({style.blend.describe()}); student: {student_info['source']}{where}; "
          f"balanced loss: {tf.loss_fn.name}")  # fmt: skip

    metric = d_feature_metric(style.base, main_device)
    rows, inputs, outputs = bench_quality(tf, student, metric, plan)
    rows += bench_identity(tf, student, plan, (inputs, outputs))
    for device in devices:
        rows += demo_speed(tfs[device], student.to(device), plan)
    for device in devices:
        rows += config_f_speed(plan, device)
    student.to(main_device)
    summary = summarise(rows)
    print_summary(summary)

    meta = bench_gpu.run_meta(
        args, names, plan, started, cf_student=cf_student_kwargs(plan), style=style.name,
        blend=style.blend.to_json(), student=student_info, balanced_loss=tf.loss_fn.name,
    )  # fmt: skip
    bench_gpu.finish(meta, {"rows": rows, "summary": summary}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
