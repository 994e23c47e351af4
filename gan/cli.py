"""``toonify`` command line: inspect, convert, sample and blend checkpoints."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from gan.checkpoints import CheckpointError, generator_to_data, read_checkpoint, write_checkpoint
from gan.images import parse_seeds, save_grid, z_from_seeds


def _device(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_info(args: argparse.Namespace) -> int:
    data = read_checkpoint(args.checkpoint)
    cfg = data.generator_config
    info = {
        "format": data.source_format,
        "resolution": cfg.resolution,
        "num_ws": cfg.num_ws,
        "w_dim": cfg.w_dim,
        "z_dim": cfg.z_dim,
        "mapping_layers": cfg.n_mlp,
        "channels": {str(k): v for k, v in cfg.channels.items()},
        "has_w_avg": data.w_avg is not None,
        "has_discriminator": data.discriminator_state is not None,
        "parameters": sum(t.numel() for t in data.generator_state.values()),
        "meta": {k: v for k, v in data.meta.items() if k != "generator"},
    }
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    data = read_checkpoint(args.input)
    data.meta["converted_from"] = {"path": Path(args.input).name, "format": data.source_format}
    out = write_checkpoint(data, args.output, args.format)
    print(f"wrote {out} ({args.format or out.suffix.lstrip('.')})", file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from gan.checkpoints import load_generator

    device = _device(args.device)
    G = load_generator(args.checkpoint, device=device)
    seeds = parse_seeds(args.seeds)
    images = []
    with torch.no_grad():
        for start in range(0, len(seeds), args.batch):
            z = z_from_seeds(seeds[start : start + args.batch], G.z_dim).to(device)
            w = G.mapping(z, truncation_psi=args.truncation)
            ws = w.unsqueeze(1).expand(-1, G.num_ws, -1)
            images.append(G.synthesis(ws, noise_mode=args.noise_mode).cpu())
            print(f"  {min(start + args.batch, len(seeds))}/{len(seeds)} images", file=sys.stderr)
    out = save_grid(torch.cat(images), args.out, columns=args.columns)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _numbers(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{what} must be numbers separated by commas, got {text!r}") from None


def _structure_index(text: str, models: int) -> int | None:
    """--structure-from for --shares blends: base (0), toon (the first TOON, 1) or a model's index."""
    if text is None:
        return None
    index = {"base": 0, "toon": 1}.get(text)
    if index is None:
        if not text.isdigit():
            raise ValueError(f"--structure-from must be base, toon or a model index, got {text!r}")
        index = int(text)
    if index >= models:
        raise ValueError(f"--structure-from {text}: there are only {models} models (0 is BASE, 1… the TOONs)")
    return index


def cmd_blend(args: argparse.Namespace) -> int:
    from gan.blending import BlendSpec, base_and_toon_shares, blend, blend_many
    from gan.checkpoints import load_generator

    if args.shares is not None:
        if len(args.shares) != len(args.toons):
            raise ValueError(f"give --shares once per TOON, in order: {len(args.toons)} TOONs, {len(args.shares)} rows")
        if args.weights is not None or args.width is not None or args.swap is not None:
            raise ValueError("--shares replaces --swap, --width and --weights")
        rows = base_and_toon_shares([_numbers(row, "--shares") for row in args.shares])
        models = [load_generator(path) for path in (args.base, *args.toons)]
        G = blend_many(models, rows, structure_from=_structure_index(args.structure_from, len(models)))
        out = write_checkpoint(generator_to_data(G), args.out)
        shown = "; ".join(f"{name}: {' '.join(f'{v:g}' for v in row)}" for name, row in
                          zip(("base", *(f"toon{i}" for i in range(1, len(rows)))), rows, strict=True))  # fmt: skip
        print(f"wrote {out}: {len(models)} models, shares per layer {shown}", file=sys.stderr)
        return 0
    if len(args.toons) != 1:
        raise ValueError(f"blending {len(args.toons)} TOONs needs --shares, once per TOON (see --help)")
    structure = args.structure_from or "toon"
    if structure not in ("toon", "base"):
        raise ValueError("--structure-from of a two-model blend is toon or base")
    if args.weights is not None:
        spec = BlendSpec(mode="weights", weights=_numbers(args.weights, "--weights"), structure_from=structure)
    elif args.width:
        swap = args.swap or 32
        spec = BlendSpec(mode="smooth", resolution=swap, width=args.width, structure_from=structure)
    else:
        spec = BlendSpec(mode="swap", resolution=args.swap or 32, structure_from=structure)
    base = load_generator(args.base)
    toon = load_generator(args.toons[0])
    G = blend(base, toon, spec)
    out = write_checkpoint(generator_to_data(G), args.out)
    print(f"wrote {out}: {spec.describe()}", file=sys.stderr)
    return 0


class TerminalProgress:
    """A one-line progress bar per stage on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, stream=None) -> None:
        stream = stream or sys.stderr  # looked up now: a default bound at import would outlive a replaced stderr
        self.stream, self.tty, self.last = stream, stream.isatty(), None

    def __call__(self, stage: str, step: int, total: int) -> None:
        width = 30
        filled = int(width * step / max(total, 1))
        line = f"{stage:>8} [{'#' * filled}{'.' * (width - filled)}] {step}/{total}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if step >= total else ""))
        elif step >= total or self.last != stage:
            self.stream.write(line + "\n")
        self.last = stage
        self.stream.flush()


def _spec_from_args(args: argparse.Namespace, default):
    from gan.blending import BlendSpec

    if args.swap is None and args.width is None:
        return default
    swap = args.swap if args.swap is not None else (default.resolution or 32)
    if args.width:
        return BlendSpec(mode="smooth", resolution=swap, width=args.width, structure_from="toon")
    return BlendSpec(mode="swap", resolution=swap, structure_from="toon")


def _toonifier(args: argparse.Namespace):
    from dataclasses import replace

    from gan.pipeline import DEFAULT_SPEC, MODES, Toonifier
    from gan.styles import get_style

    students = [Path(p) for p in getattr(args, "student", None) or []]
    if args.base or args.toon:
        if not (args.base and (args.toon or args.command == "project")):
            raise ValueError("give both --base and --toon, or --style")
        base, toon, encoder, spec = Path(args.base), Path(args.toon or args.base), args.encoder, DEFAULT_SPEC
    else:
        style = get_style(args.style)
        base, toon, encoder, spec = style.base, style.toon, args.encoder or style.encoder, style.blend
        students += [entry.file for entry in style.students]
    step_mode = args.mode or "balanced"
    if args.mode == "instant" and not students:
        raise ValueError("instant mode needs a student (`toonify distill`, listed in the manifest or --student)")
    return Toonifier.from_files(
        base,
        toon,
        encoder_path=encoder,
        vgg_path=args.vgg,
        lpips_path=args.lpips,
        spec=_spec_from_args(args, spec) if hasattr(args, "swap") else spec,
        device=args.device,
        min_face_size=args.min_face_size,
        modes=None
        if args.steps is None or args.mode == "instant"
        else {step_mode: replace(MODES[step_mode], steps=args.steps)},
        students=students,
    )


def cmd_toon(args: argparse.Namespace) -> int:
    from gan.imageio import load_image

    toonifier = _toonifier(args)
    photo = load_image(args.photo)
    mode = args.mode or ("instant" if toonifier.student_for() is not None else "balanced")
    result = toonifier.toonify(photo, mode=mode, all_faces=args.all_faces, progress=TerminalProgress())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.composite.save(out)
    for i, (crop, aligned) in enumerate(zip(result.crops, result.aligned, strict=True)):
        crop.save(out.with_name(f"{out.stem}_toon{i}.png"))
        aligned.image.save(out.with_name(f"{out.stem}_face{i}.png"))
    for face in result.too_small:
        print(f"note: skipped a face of {face.size}px (smaller than {args.min_face_size}px)", file=sys.stderr)
    times = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    print(f"wrote {out} and {len(result.crops)} toon crop(s) ({mode} mode); {times}", file=sys.stderr)
    return 0


def cmd_project(args: argparse.Namespace) -> int:
    from gan.imageio import load_image
    from gan.pipeline import to_tensor

    toonifier = _toonifier(args)
    alignment = toonifier.aligner.align_all(
        load_image(args.photo), output_size=toonifier.base.resolution, largest_only=not args.all_faces
    )
    crops = to_tensor([a.image for a in alignment], toonifier.device)
    latents, losses = toonifier.project(crops, args.mode, progress=TerminalProgress())
    torch.save(
        {
            "latents": latents.detach().cpu(),
            "losses": None if losses is None else losses.cpu(),
            "base_hash": toonifier.base.meta.get("content_hash", ""),
        },
        args.out,
    )
    print(f"wrote {args.out}: {len(alignment)} face(s), latents {list(latents.shape)}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gan.demo import run_demo

    run_demo(Path(args.out))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from gan.finetune import DatasetRefusedError, FinetuneSettings, metrics_table, run_finetune

    given = {
        "kimg": args.kimg,
        "snapshot_kimg": args.snapshot_kimg,
        "batch": args.batch,
        "freeze_d": args.freeze_d,
        "freeze_g": args.freeze_g,
        "aug": args.aug,
        "seed": args.seed,
        "metric_samples": args.metric_samples,
        "swap_resolutions": None if args.swap is None else tuple(int(r) for r in args.swap.split(",")),
    }
    # On --resume only the flags given are compared with the run's own settings; the rest are the run's.
    settings = None if args.resume else FinetuneSettings(**{k: v for k, v in given.items() if v is not None})
    if args.resume:
        saved = Path(args.out) / "settings.json"
        base = FinetuneSettings.from_json(json.loads(saved.read_text())) if saved.is_file() else FinetuneSettings()
        settings = replace(base, **{k: v for k, v in given.items() if v is not None})

    def on_snapshot(row: dict) -> None:
        kid = "-" if row.get("kid") is None else f"{row['kid']:.4f}"
        print(f"\nsnapshot at {row['kimg']:.3f} kimg: KID(D) {kid}, augment p {row['aug_p']:.3f}", file=sys.stderr)

    try:
        result = run_finetune(
            args.base,
            args.data,
            args.out,
            settings,
            resume=args.resume,
            device=_device(args.device),
            align=not args.no_align,
            min_images=args.min_images,
            progress=TerminalProgress(),
            on_snapshot=on_snapshot,
        )
    except DatasetRefusedError as e:
        print(f"toonify: the dataset was refused:\n{e}", file=sys.stderr)
        return 2
    print(metrics_table(result.metrics))
    print(f"{result.status}: {result.steps} steps ({result.kimg:g} kimg); report in {result.out_dir / 'report.json'}")
    if result.checkpoint is not None:
        print(f"toon checkpoint: {result.checkpoint}; blend previews in {result.out_dir / 'blends'}")
    return 0 if result.status == "done" else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toonify", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="print a checkpoint's architecture and metadata")
    s.add_argument("checkpoint")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("convert", help="convert a checkpoint (.pt/.pkl/.safetensors) to .safetensors or .pt")
    s.add_argument("input")
    s.add_argument("output", help="*.safetensors (ours) or *.pt (rosinality)")
    s.add_argument("--format", choices=["native", "rosinality"], help="override the format chosen by suffix")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("generate", help="sample a grid of images from seeds")
    s.add_argument("checkpoint")
    s.add_argument("--seeds", default="0-7", help="e.g. 0-7 or 1,5,9")
    s.add_argument("--truncation", type=float, default=1.0)
    s.add_argument("--noise-mode", choices=["const", "random", "none"], default="const")
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--columns", type=int)
    s.add_argument("--device")
    s.add_argument("--out", default="grid.png")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser(
        "blend",
        help="layer-swap a base and a toon model (or mix several models per layer) into a blended model",
        description="Blend generators layer by layer. Any checkpoint works as BASE or TOON, fine-tune snapshots "
        "(RUN/snapshots/kimg*.safetensors) included. Two models: --swap, --width or --weights. More models: "
        "toonify blend BASE TOON1 TOON2 --shares S1 --shares S2, one --shares per TOON in order; a row gives that "
        "TOON's share at each blend position, 4x4 first (2*log2(R)-2 values: 10 for 64 px, 14 for 256 px, 18 for "
        "1024 px), and BASE takes what the TOONs leave at each position (shares at a position may not exceed 1). "
        "E.g. 64 px, a snapshot for the coarse layers and the final model for the middle ones: toonify blend "
        "base.safetensors run/snapshots/kimg000004.000.safetensors run/toon.safetensors "
        "--shares 1,1,1,1,0,0,0,0,0,0 --shares 0,0,0,0,1,1,0.5,0.5,0,0 --out mix.safetensors",
    )
    s.add_argument("base", help="base model (model index 0 for --structure-from)")
    s.add_argument("toons", nargs="+", metavar="toon", help="toon model(s): a fine-tune result or a snapshot")
    s.add_argument("--swap", type=int, help="swap resolution (4..1024; default 32)")
    s.add_argument("--width", type=float, help="smooth transition width (logistic); omit for a hard swap")
    s.add_argument(
        "--structure-from",
        help="the model giving the mapping network, 4x4 conv1 and w_avg: toon (default) or base; with --shares "
        "also a model index (0 BASE, 1 the first TOON, ...; default: the largest share at 4x4)",
    )
    s.add_argument("--weights", help="explicit per-layer toon weights, comma separated (overrides --swap)")
    s.add_argument(
        "--shares",
        action="append",
        metavar="S,S,...",
        help="one per TOON, in order: its share at each blend position (4x4 first); BASE gets the rest",
    )
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_blend)

    for name, helptext in [
        ("toon", "toonify every face of a photo and paste the toons back"),
        ("project", "find the base model's W+ latents of the faces in a photo"),
    ]:
        s = sub.add_parser(name, help=helptext)
        s.add_argument("photo")
        s.add_argument("--style", help="a style from the model manifest (default: the manifest's default)")
        s.add_argument("--base", help="base checkpoint (instead of --style)")
        s.add_argument("--encoder", help="encoder checkpoint for the base model")
        if name == "toon":
            s.add_argument(
                "--mode",
                choices=["instant", "fast", "balanced", "quality"],
                help="default: instant where the blend has a student, else balanced",
            )
            s.add_argument("--student", action="append", help="a distilled student file (repeatable)")
        else:
            s.add_argument("--mode", choices=["fast", "balanced", "quality"], default="balanced")
        s.add_argument("--steps", type=int, help="optimisation steps (default: the mode's)")
        s.add_argument("--all-faces", action="store_true", help="every face, not just the largest")
        s.add_argument("--min-face-size", type=int, default=64)
        s.add_argument("--vgg", help="torchvision VGG16 weights for LPIPS (or TOONIFY_VGG16_PATH)")
        s.add_argument("--lpips", help="LPIPS v0.1 vgg.pth linear weights (or TOONIFY_LPIPS_PATH)")
        s.add_argument("--device")
        s.add_argument("--out", required=True)
        if name == "toon":
            s.add_argument("--toon", help="toon checkpoint (instead of --style)")
            s.add_argument("--swap", type=int, help="swap resolution (default: the style's)")
            s.add_argument("--width", type=float, help="smooth transition width")
            s.set_defaults(func=cmd_toon)
        else:
            s.set_defaults(func=cmd_project, toon=None)

    from gan.distill import add_distill_parser
    from gan.encoder import add_train_encoder_parser
    from gan.explore import add_explore_parsers
    from gan.model_admin import add_styles_parser
    from gan.weights import add_weights_parser

    add_train_encoder_parser(sub)
    add_distill_parser(sub)
    add_explore_parsers(sub)  # directions, name-direction, list-directions, edit, mix, sweep, interpolate
    add_styles_parser(sub)  # styles add | list | show | remove | set-default
    add_weights_parser(sub)  # weights check

    s = sub.add_parser("finetune", help="fine-tune a base model on a folder or zip of images (a toon style)")
    s.add_argument("base", help="base checkpoint with a discriminator (.safetensors, rosinality .pt, NVIDIA .pkl)")
    s.add_argument("data", help="a folder or a .zip of images")
    s.add_argument("--out", required=True, help="run folder: snapshots, previews, metrics, the toon checkpoint")
    s.add_argument("--kimg", type=float, help="training length in thousands of images (default 20)")
    s.add_argument("--snapshot-kimg", type=float, help="snapshot, preview and metrics every this many kimg (4)")
    s.add_argument("--batch", type=int, help="batch size (8)")
    s.add_argument("--freeze-d", type=int, help="FreezeD: the first K discriminator blocks stay fixed (2)")
    s.add_argument("--freeze-g", type=int, help="FreezeG: train only the top N generator resolutions (all)")
    s.add_argument("--aug", choices=["ada", "diffaug", "none"], help="adaptive, fixed or no augmentation (ada)")
    s.add_argument("--seed", type=int)
    s.add_argument("--metric-samples", type=int, help="generated images for KID at each snapshot (256)")
    s.add_argument("--swap", help="candidate swap resolutions, comma separated (default: all)")
    s.add_argument("--min-images", type=int, default=8)
    s.add_argument("--no-align", action="store_true", help="centre crops only (no dlib face alignment)")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its last snapshot")
    s.add_argument("--device")
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("demo", help="build tiny models, convert, blend and sample them (no downloads)")
    s.add_argument("--out", default="data/demo")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse and dispatch; bad input ends with a one-line message and exit status 2 (shared by the full CLI)."""
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ValueError, OSError) as e:  # bad input: a message, not a traceback
        print(f"toonify: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
