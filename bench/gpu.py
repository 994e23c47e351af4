"""Device benchmark (issue 11): synthesis, projection, fine-tuning and encoder training in one run.

    PYTHONPATH=. python bench/gpu.py                      # CUDA if present: the full plan (about 5 min on an H200)
    python bench/gpu.py --device cpu --quick              # the same code paths at toy sizes (under a minute)
    python bench/gpu.py --only synthesis,projection       # a subset of the sections

Networks are config-f (channel multiplier 2) with random weights: speed does not depend on the values. The
quick plan uses 16 and 32 px networks of 32 channels, 32-dim latents and short step counts. Rows:

* synthesis: images/s of ``G.synthesis`` (no grad) at 2 resolutions x batch 1/16/32 x fp32/bf16 autocast;
* projection: ``Toonifier.project`` per mode (fast, balanced, quality) x 2 resolutions x 1/8/32 faces, with
  a random encoder and the loss ``build_perceptual_loss`` picks (LPIPS when its files are configured, else the
  discriminator-feature fallback); seconds per face and peak memory. Step times come from the progress callback
  (synchronised); steps past ``--max-steps`` are extrapolated from the median step and the row says how many;
* finetune: ``gan.training.Trainer`` with the fine-tune recipe (FreezeD 2, ADA, lazy R1 every 16, bf16 autocast
  on CUDA), warm, over ``--r1-windows`` whole R1 intervals; s/kimg with R1 amortised, and the R1 step's cost
  as a multiple of a plain step;
* encoder: ``gan.encoder.train_encoder`` images/s (median step after the first).

Peak memory is ``torch.cuda.max_memory_allocated`` per row on CUDA; on CPU rows say n/a and the header gives
the process's peak RSS. Prints a table and writes JSON (``bench/results/gpu-<date>.json`` by default).
Imports only ``gan`` modules that need neither dlib nor the backend, so it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # the repository, not bench/, on the path (bench/ has no package names to shadow)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gan.encoder import Encoder, train_encoder  # noqa: E402
from gan.finetune import FinetuneSettings  # noqa: E402
from gan.networks import Discriminator, Generator, GeneratorConfig, default_channels  # noqa: E402
from gan.perceptual import build_perceptual_loss  # noqa: E402
from gan.pipeline import MODES, Toonifier  # noqa: E402
from gan.training import Trainer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SECTIONS = ("synthesis", "projection", "finetune", "encoder")


@dataclass(frozen=True)
class Plan:
    synth_resolutions: tuple[int, ...] = (256, 1024)
    synth_batches: tuple[int, ...] = (1, 16, 32)
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    proj_resolutions: tuple[int, ...] = (256, 1024)
    proj_faces: tuple[int, ...] = (1, 8, 32)
    modes: tuple[str, ...] = ("fast", "balanced", "quality")
    max_steps: int = 20  # projection steps timed per row; the rest of a mode's steps are extrapolated
    ft_resolutions: tuple[int, ...] = (256, 1024)
    ft_batches: tuple[int, ...] = (32, 16)  # per fine-tune resolution
    r1_windows: int = 2  # whole lazy-R1 intervals timed per fine-tune row
    profile_r1: bool = False  # profile one more R1 step and keep its costliest operators in the row
    enc_resolutions: tuple[int, ...] = (256, 1024)
    enc_batch: int = 8
    enc_steps: int = 12
    synth_repeats: int = 5
    channel_max: int = 512
    channel_multiplier: int = 2
    w_dim: int = 512  # also z_dim
    n_mlp: int = 8


QUICK = Plan(
    synth_resolutions=(16, 32),
    proj_resolutions=(16, 32),
    max_steps=3,
    ft_resolutions=(16, 32),
    ft_batches=(4, 4),
    r1_windows=1,
    enc_resolutions=(16, 32),
    enc_batch=4,
    enc_steps=4,
    synth_repeats=2,
    channel_max=32,
    channel_multiplier=1,
    w_dim=32,
    n_mlp=2,
)


def expected_rows(plan: Plan) -> list[tuple]:
    """Every row key the plan produces: (section, resolution, ...); the test checks the JSON has each."""
    rows: list[tuple] = []
    rows += [("synthesis", r, b, d) for r in plan.synth_resolutions for b in plan.synth_batches for d in plan.dtypes]
    rows += [("projection", r, m, f) for r in plan.proj_resolutions for m in plan.modes for f in plan.proj_faces]
    rows += [("finetune", r, b) for r, b in zip(plan.ft_resolutions, plan.ft_batches, strict=True)]
    rows += [("encoder", r, plan.enc_batch) for r in plan.enc_resolutions]
    return rows


def row_key(row: dict) -> tuple:
    section = row["section"]
    if section == "synthesis":
        return (section, row["res"], row["batch"], row["dtype"])
    if section == "projection":
        return (section, row["res"], row["mode"], row["faces"])
    return (section, row["res"], row["batch"])


# ----------------------------------------------------------------------------------------------------------
# Helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def networks(res: int, plan: Plan, device: torch.device) -> tuple[Generator, Discriminator]:
    torch.manual_seed(0)
    channels = default_channels(res, plan.channel_multiplier, plan.channel_max)
    config = GeneratorConfig(resolution=res, w_dim=plan.w_dim, z_dim=plan.w_dim, n_mlp=plan.n_mlp, channels=channels)
    G = Generator(config).to(device)
    D = Discriminator(resolution=res, channels=channels).to(device)
    with torch.no_grad():
        G.compute_w_avg(n=1000)
    return G, D


def guarded(device: torch.device, base: dict, fn: Callable[[], dict]) -> dict:
    """One row: ``base`` plus what ``fn`` measured, or the error (out of memory) that stopped it."""
    reset_peak(device)
    try:
        row = {**base, **fn()}
    except torch.OutOfMemoryError as e:
        row = {**base, "error": f"out of memory: {str(e).splitlines()[0]}"}
    row["peak_gib"] = peak_gib(device)
    reset_peak(device)
    return row


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------------------
# Sections


def bench_synthesis(plan: Plan, device: torch.device) -> list[dict]:
    rows = []
    for res in plan.synth_resolutions:
        G, _ = networks(res, plan, device)
        G.eval().requires_grad_(False)
        for batch in plan.synth_batches:
            ws = torch.randn(batch, G.num_ws, G.w_dim, device=device)
            for name in plan.dtypes:
                dtype = DTYPES[name]

                def forward(dtype: torch.dtype = dtype, ws: torch.Tensor = ws, G: Generator = G) -> None:
                    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                        G.synthesis(ws)

                def measure(forward: Callable[[], None] = forward, batch: int = batch) -> dict:
                    s = timed(forward, device, plan.synth_repeats)
                    return {"img_s": batch / s, "ms_img": 1000 * s / batch}

                rows.append(
                    guarded(device, {"section": "synthesis", "res": res, "batch": batch, "dtype": name}, measure)
                )
                print_row(rows[-1])
    return rows


def bench_projection(plan: Plan, device: torch.device) -> list[dict]:
    rows = []
    for res in plan.proj_resolutions:
        G, D = networks(res, plan, device)
        torch.manual_seed(1)
        enc = Encoder(res, G.num_ws, G.w_dim).to(device)
        with torch.no_grad():
            enc.w_avg.copy_(G.w_avg)
        loss = build_perceptual_loss(discriminator=D).to(device)
        tf = Toonifier(G, G, encoder=enc, loss_fn=loss, device=device)
        for mode in plan.modes:
            settings = MODES[mode]
            timed_steps = min(settings.steps, plan.max_steps)
            tf.modes[mode] = type(settings)(settings.use_encoder, timed_steps, settings.recipe)
            for faces in plan.proj_faces:
                crops = (
                    torch.rand(faces, 3, res, res, generator=torch.Generator().manual_seed(faces)).to(device) * 2 - 1
                )

                measure = functools.partial(project_row, tf, mode, crops, settings.steps, device)

                base = {"section": "projection", "res": res, "mode": mode, "faces": faces, "loss": loss.name}
                tf.project(crops[:1], mode, seeds=[0])  # warm-up (kernels, allocator) outside the row
                rows.append(guarded(device, base, measure))
                print_row(rows[-1])
            tf.modes[mode] = settings
    return rows


def project_row(tf: Toonifier, mode: str, crops: torch.Tensor, total_steps: int, device: torch.device) -> dict:
    stamps: list[float] = []

    def progress(stage: str, step: int, steps: int) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    sync(device)
    t0 = time.perf_counter()
    tf.project(crops, mode, progress=progress, seeds=list(range(len(crops))))
    sync(device)
    elapsed = time.perf_counter() - t0
    timed_steps = len(stamps)
    intervals = np.diff([t0, *stamps])[1:]  # the first step also carries the set-up (encoder, latent stats)
    per_step = float(np.median(intervals)) if len(intervals) else (elapsed if timed_steps else 0.0)
    total = elapsed + (total_steps - timed_steps) * per_step
    n = len(crops)
    return {"steps": total_steps, "timed_steps": timed_steps, "s_per_step": per_step if timed_steps else None,
            "s_total": total, "s_per_face": total / n, "extrapolated_steps": total_steps - timed_steps}  # fmt: skip


def bench_finetune(plan: Plan, device: torch.device) -> list[dict]:
    rows = []
    for res, batch in zip(plan.ft_resolutions, plan.ft_batches, strict=True):
        base = {"section": "finetune", "res": res, "batch": batch}
        rows.append(guarded(device, base, lambda res=res, batch=batch: finetune_row(res, batch, plan, device)))
        print_row(rows[-1])
    return rows


def finetune_row(res: int, batch: int, plan: Plan, device: torch.device) -> dict:
    G, D = networks(res, plan, device)
    images = np.random.default_rng(0).integers(0, 256, (max(64, batch), res, res, 3), dtype=np.uint8)
    settings = FinetuneSettings(batch=batch, aug="ada", freeze_d=2)
    trainer = Trainer(G, D, images, settings.train_config(res))
    every = trainer.cfg.r1_every
    for _ in range(2):  # warm-up: step 0 regularises, step 1 is plain
        trainer.step()
    trainer.step_count = every  # the first timed step regularises; the window covers whole R1 intervals
    plain, r1 = [], []
    for _ in range(plan.r1_windows * every):
        is_r1 = trainer.step_count % every == 0
        sync(device)
        t0 = time.perf_counter()
        trainer.step()
        sync(device)
        (r1 if is_r1 else plain).append(time.perf_counter() - t0)
    total = sum(plain) + sum(r1)
    steps = len(plain) + len(r1)
    plain_s, r1_s = statistics.median(plain), statistics.median(r1)
    profile = {"r1_top_ops": profile_r1_step(trainer, device)} if plan.profile_r1 else {}
    return {**profile, "amp": trainer.amp, "ada": True, "freeze_d": 2, "r1_every": every, "timed_steps": steps,
            "r1_steps": len(r1), "s_per_kimg": total / (steps * batch / 1000), "plain_step_s": plain_s,
            "r1_step_s": r1_s, "r1_over_plain": r1_s / plain_s}  # fmt: skip


def profile_r1_step(trainer: Trainer, device: torch.device, top: int = 10) -> list[dict]:
    """The operators that cost most in one warm R1 step (self time on the device, or the CPU without CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    trainer.step_count = trainer.cfg.r1_every  # the next step regularises
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        trainer.step()
        sync(device)
    on = "device" if device.type == "cuda" else "cpu"
    events = [e for e in prof.key_averages() if getattr(e, f"self_{on}_time_total", 0) > 0]
    events.sort(key=lambda e: getattr(e, f"self_{on}_time_total"), reverse=True)
    return [
        {"op": e.key, "calls": e.count, "self_ms": getattr(e, f"self_{on}_time_total") / 1000} for e in events[:top]
    ]


def bench_encoder(plan: Plan, device: torch.device) -> list[dict]:
    rows = []
    for res in plan.enc_resolutions:
        base = {"section": "encoder", "res": res, "batch": plan.enc_batch}
        rows.append(guarded(device, base, lambda res=res: encoder_row(res, plan, device)))
        print_row(rows[-1])
    return rows


def encoder_row(res: int, plan: Plan, device: torch.device) -> dict:
    G, _ = networks(res, plan, device)
    stamps: list[float] = []

    def progress(step: int, steps: int, loss: float) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    train_encoder(G, steps=plan.enc_steps, batch_size=plan.enc_batch, fit_samples=0, progress=progress)
    step_s = float(np.median(np.diff(stamps)))
    return {"steps": plan.enc_steps, "s_per_step": step_s, "img_s": plan.enc_batch / step_s}


# ----------------------------------------------------------------------------------------------------------
# Output


def fmt_cell(v: object) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table_row(title: str, cols: tuple[str, ...], cells: list[str], printed: set[str]) -> None:
    """One markdown table row; the table's heading and header first, the first time ``title`` is seen."""
    if title not in printed:
        printed.add(title)
        print(f"\n## {title}\n| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    print("| " + " | ".join(cells) + " |", flush=True)


def print_section_row(row: dict, columns: dict, titles: dict, printed: set[str]) -> None:
    """A bench row as a markdown table row under its section's title: ``columns[section]`` cells, an error in
    place of the last cell, a note after them."""
    cols = columns[row["section"]]
    cells = [fmt_cell(row.get(c)) for c in cols]
    if row.get("error"):
        cells[-1] = row["error"]
    if row.get("note"):
        cells.append(row["note"])
    print_table_row(titles[row["section"]], cols, cells, printed)


def device_names(devices: list[torch.device]) -> list[str]:
    return [torch.cuda.get_device_name(d) if d.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
            for d in devices]  # fmt: skip


def run_meta(args: argparse.Namespace, names: list[str], plan: object, started: float, **extra: object) -> dict:
    """What every bench's JSON records about its run: date, torch, devices, threads, plan, time, peak RSS."""
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "devices": names,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "plan": asdict(plan),  # type: ignore[arg-type]
        **extra,
        "seconds": time.perf_counter() - started,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # Linux: KiB
    }


def finish(meta: dict, payload: dict, json_path: str | None) -> None:
    """Print the run's time and peak memory; with ``json_path``, write ``{"meta": meta, **payload}`` there."""
    print(f"\n# {meta['seconds']:.0f} s; peak RSS {meta['peak_rss_gib']:.2f} GiB")
    if json_path:
        out = Path(json_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, **payload}, indent=1, default=str) + "\n")
        print(f"# wrote {out}")


COLUMNS = {
    "synthesis": ("res", "batch", "dtype", "img_s", "ms_img", "peak_gib"),
    "projection": ("res", "mode", "faces", "steps", "timed_steps", "s_per_step", "s_per_face", "peak_gib"),
    "finetune": ("res", "batch", "amp", "s_per_kimg", "plain_step_s", "r1_step_s", "r1_over_plain", "peak_gib"),
    "encoder": ("res", "batch", "img_s", "s_per_step", "peak_gib"),
}
_printed: set[str] = set()


def print_row(row: dict) -> None:
    print_section_row(row, COLUMNS, {section: section for section in COLUMNS}, _printed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes: the same code paths in under a minute")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--max-steps", type=int, help="projection steps timed per row (default: 20; quick: 3)")
    p.add_argument("--finetune-res", help="fine-tune resolutions, comma-separated (e.g. 64 to time R1 on CPU)")
    p.add_argument("--finetune-batch", type=int, help="fine-tune batch for every --finetune-res")
    p.add_argument("--profile-r1", action="store_true", help="fine-tune rows: the costliest operators of an R1 step")
    p.add_argument("--out", help="JSON path (default bench/results/gpu-<date>[-quick].json)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    plan = QUICK if args.quick else Plan()
    if args.max_steps is not None:
        plan = Plan(**{**asdict(plan), "max_steps": args.max_steps})
    if args.finetune_res:
        res = tuple(int(r) for r in args.finetune_res.split(","))
        batch = args.finetune_batch or plan.ft_batches[0]
        plan = Plan(**{**asdict(plan), "ft_resolutions": res, "ft_batches": (batch,) * len(res)})
    if args.profile_r1:
        plan = Plan(**{**asdict(plan), "profile_r1": True})
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {SECTIONS}")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# bench/gpu.py{' --quick' if args.quick else ''}: torch {torch.__version__}, {name}")
    started = time.perf_counter()
    rows: list[dict] = []
    runners = {"synthesis": bench_synthesis, "projection": bench_projection, "finetune": bench_finetune,
               "encoder": bench_encoder}  # fmt: skip
    for section in only:
        rows += runners[section](plan, device)
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "device": name,
        "quick": args.quick,
        "sections": only,
        "plan": asdict(plan),
        "seconds": time.perf_counter() - started,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # Linux: KiB
    }
    day = dt.date.today().isoformat()
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu-{day}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    for row in rows:
        for op in row.get("r1_top_ops", []):
            print(f"# R1 step at {row['res']} px: {op['op']} x{op['calls']}: {op['self_ms']:.1f} ms")
    print(f"\n# {meta['seconds']:.0f} s; peak RSS {meta['peak_rss_gib']:.2f} GiB; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
