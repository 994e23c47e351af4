"""``toonify`` command line: inspect, convert, sample and blend checkpoints."""

from __future__ import annotations

import argparse
import json
import sys
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


def cmd_blend(args: argparse.Namespace) -> int:
    from gan.blending import BlendSpec, blend
    from gan.checkpoints import load_generator

    if args.weights is not None:
        spec = BlendSpec(mode="weights", weights=tuple(float(x) for x in args.weights.split(",")))
    elif args.width:
        spec = BlendSpec(mode="smooth", resolution=args.swap, width=args.width, structure_from=args.structure_from)
    else:
        spec = BlendSpec(mode="swap", resolution=args.swap, structure_from=args.structure_from)
    base = load_generator(args.base)
    toon = load_generator(args.toon)
    G = blend(base, toon, spec)
    out = write_checkpoint(generator_to_data(G), args.out)
    print(f"wrote {out}: {spec.describe()}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gan.demo import run_demo

    run_demo(Path(args.out))
    return 0


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

    s = sub.add_parser("blend", help="layer-swap a base and a toon model into a blended model")
    s.add_argument("base")
    s.add_argument("toon")
    s.add_argument("--swap", type=int, default=32, help="swap resolution (8..1024)")
    s.add_argument("--width", type=float, help="smooth transition width (logistic); omit for a hard swap")
    s.add_argument("--structure-from", choices=["toon", "base"], default="toon")
    s.add_argument("--weights", help="explicit per-layer toon weights, comma separated (overrides --swap)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_blend)

    s = sub.add_parser("demo", help="build tiny models, convert, blend and sample them (no downloads)")
    s.add_argument("--out", default="data/demo")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"toonify: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
