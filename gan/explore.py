"""``toonify`` commands that explore the latent space: directions, name-direction, list-directions, edit, mix,
sweep and interpolate (the library is :mod:`gan.editing`).

A style's directions are made for its toon generator and kept beside its models
(``<models_dir>/<style>.directions.safetensors``, listed in the manifest with ``--register``). Seeded faces
are drawn in the base model's W, the space photos are projected into, and rendered by the style's blended
model, as the fine-tune previews are; with ``--checkpoint`` one generator does both.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from gan.editing import (
    DIRECTIONS_SUFFIX,
    METHODS,
    DirectionSet,
    blend_sweep_frames,
    direction_scales,
    directions_meta,
    ganspace_directions,
    interpolate,
    load_directions,
    load_style_directions,
    mix_styles,
    name_direction,
    parse_layers,
    register_directions,
    render,
    save_animation,
    save_directions,
    seed_latents,
    sefa_directions,
    style_directions_path,
)
from gan.images import make_grid, parse_seeds
from gan.networks import Generator

ANIMATION_SUFFIXES = (".gif", ".webp")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _device(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _models_dir(args: argparse.Namespace) -> Path | None:
    return Path(args.models_dir) if getattr(args, "models_dir", None) else None


def _strengths(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"bad strengths {text!r}: give numbers separated by commas, e.g. -3,0,3") from None
    if not values:
        raise ValueError("no strengths given")
    return values


def _style_generators(args: argparse.Namespace, *, need_base: bool = True) -> tuple[Generator, Generator, str]:
    """(mapper, renderer, label): with --checkpoint one generator; else the style's base (W, as photos) and its
    blended model (what a toon is rendered by)."""
    from gan.blending import blend
    from gan.checkpoints import load_generator
    from gan.styles import get_style

    device = _device(args.device)
    if getattr(args, "checkpoint", None):
        G = load_generator(args.checkpoint, device)
        return G, G, Path(args.checkpoint).name
    style = get_style(args.style, _models_dir(args))
    base, toon = load_generator(style.base, device), load_generator(style.toon, device)
    return base, blend(base, toon, style.blend), f"style {style.name} ({style.blend.describe()})"


def _image_path(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"write the image as one of {', '.join(IMAGE_SUFFIXES)}, not {out.name!r}")
    return out


def _save_image(image, out: str | Path) -> Path:
    out = _image_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out


# ----------------------------------------------------------------------------------------------------------
# directions / name-direction / list-directions


def _directions_source(args: argparse.Namespace) -> tuple[Generator, Generator, Generator, str | None]:
    """(the generator the directions are made for, the one seeded faces are mapped by, the one previews render
    with, the style name or None)."""
    from gan.blending import blend
    from gan.checkpoints import load_generator
    from gan.styles import get_style

    device = _device(args.device)
    if Path(args.style).is_file():  # a checkpoint instead of a style
        G = load_generator(args.style, device)
        return G, G, G, None
    style = get_style(args.style, _models_dir(args))
    base, toon = load_generator(style.base, device), load_generator(style.toon, device)
    return toon, base, blend(base, toon, style.blend), style.name


def cmd_directions(args: argparse.Namespace) -> int:
    G, mapper, renderer, style = _directions_source(args)
    if args.register and style is None:
        raise ValueError("--register needs a style of the manifest, not a checkpoint file")
    if args.out is None and not args.register:
        raise ValueError("give --out FILE, or --register to keep them beside the style's models")
    out = Path(args.out) if args.out else style_directions_path(style, _models_dir(args))
    if not out.name.endswith(".safetensors"):
        raise ValueError(f"directions are written as .safetensors, not {out.name!r}")
    layers = parse_layers(G, args.layers)
    strengths = _strengths(args.preview_strengths)
    preview_seeds = parse_seeds(args.preview_seeds)
    if not 1 <= args.top <= G.w_dim:
        raise ValueError(f"--top must be in 1…{G.w_dim}, got {args.top}")
    if args.preview:
        _image_path(args.preview)

    if args.method == "ganspace":
        components, values = ganspace_directions(G, n_samples=args.samples, top_k=args.top, seed=args.seed)
    else:  # SeFa factorises the layers it is told; the style convs among them
        sefa_layers = [i for i in layers if i < G.num_ws - 1]
        if not sefa_layers:
            raise ValueError(f"SeFa needs a style conv among --layers {args.layers} (index {G.num_ws - 1} is a ToRGB)")
        components, values = sefa_directions(G, sefa_layers, top_k=args.top)
    scales = direction_scales(G, components, n_samples=args.samples, seed=args.seed)
    meta = directions_meta(G, args.method, style=style, top_k=args.top, n_samples=args.samples, seed=args.seed)
    if args.method == "sefa":
        meta["layers"] = layers
    ds = DirectionSet(components.cpu(), scales.cpu(), values.cpu(), meta)
    if out.is_file():  # names an admin gave survive a recomputation for the same generator
        try:
            old = load_directions(out, G)
        except ValueError as e:
            print(f"replacing {out} ({e})", file=sys.stderr)
            old = None
        if old is not None and old.named:
            ds.named.update(old.named)
            print(f"kept {len(old.named)} named direction(s) from {out}: {', '.join(old.named)}", file=sys.stderr)
    save_directions(out, ds)
    total = values.sum().item()
    print(f"wrote {out}: {len(ds)} {args.method} directions for generator {ds.generator_hash[:12]}", file=sys.stderr)
    for i, (v, s) in enumerate(zip(values.tolist(), scales.tolist(), strict=True)):
        share = f", {v / total:.1%} of the top {len(ds)}" if args.method == "ganspace" and total > 0 else ""
        print(f"  {i:3d}  {'variance' if args.method == 'ganspace' else 'eigenvalue'} {v:.4g}{share}, std {s:.3g}")
    if args.register:
        register_directions(_models_dir(args), style, out)
        print(f"listed {out.name} as the directions of style {style!r} in the manifest", file=sys.stderr)

    if args.preview:
        # Rows: component x seed; columns: strengths (σ), each edit on the chosen layers.
        ws = seed_latents(mapper, preview_seeds, truncation=args.truncation)
        rows = []
        for k in range(len(ds)):
            d = ds.component(k, layers)
            for j in range(len(preview_seeds)):
                rows.append(render(renderer, torch.cat([d.apply(ws[j : j + 1], s) for s in strengths])))
        path = _save_image(make_grid(torch.cat(rows), columns=len(strengths)), args.preview)
        print(
            f"wrote {path}: rows = components 0…{len(ds) - 1}"
            + (f" x seeds {args.preview_seeds}" if len(preview_seeds) > 1 else "")
            + f", columns = strengths {', '.join(f'{s:g}' for s in strengths)} std on layers {args.layers}",
            file=sys.stderr,
        )
    return 0


def _directions_file(target: str, args: argparse.Namespace) -> Path:
    """A directions file path, or a style name whose (registered or default) file exists."""
    path = Path(target)
    if path.is_file():
        return path
    if path.suffix or "/" in target:
        raise ValueError(f"no directions file {target}")
    path = style_directions_path(target, _models_dir(args))
    if not path.is_file():
        raise ValueError(f"style {target!r} has no directions yet; make them with `toonify directions {target}`")
    return path


def cmd_name_direction(args: argparse.Namespace) -> int:
    path = _directions_file(args.dirs, args)
    style = None
    if args.register:  # checked before anything is written: a file for another generator is left as it was
        from gan.checkpoints import read_checkpoint
        from gan.styles import get_style

        style = get_style(args.register, _models_dir(args))
        load_directions(path).check_generator(read_checkpoint(style.toon).meta["content_hash"])
    ds = name_direction(path, args.index, args.name, args.layers)
    print(f"named in {path}: {ds.named[args.name].describe()}", file=sys.stderr)
    if style is not None:
        register_directions(_models_dir(args), style.name, path)
        print(f"listed {path.name} as the directions of style {style.name!r} in the manifest", file=sys.stderr)
    return 0


def cmd_list_directions(args: argparse.Namespace) -> int:
    if args.target is None:
        from gan.styles import read_manifest

        ds = load_style_directions(read_manifest(_models_dir(args)).style().name, _models_dir(args))
    elif Path(args.target).is_file():
        ds = load_directions(args.target)
    else:
        ds = load_style_directions(args.target, _models_dir(args))
    print(f"{ds.method} directions for generator {ds.generator_hash[:12]} ({ds.resolution}px)")
    print(f"components: {len(ds)} (index 0…{len(ds) - 1})" if len(ds) else "components: none")
    for d in sorted(ds.named.values(), key=lambda d: d.name):
        print(f"  {d.describe()}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# edit


def cmd_edit(args: argparse.Namespace) -> int:
    if (args.photo is None) == (args.seed is None):
        raise ValueError("give a PHOTO or --seed N (one of them)")
    from gan.styles import get_style

    out = _image_path(args.out)  # refused before any model is loaded or photo projected
    models = _models_dir(args)
    style = get_style(args.style, models)
    ds = load_directions(args.directions) if args.directions else load_style_directions(style.name, models)
    direction = ds.get(args.direction, args.layers)
    if args.seed is not None:
        from gan.blending import blend
        from gan.checkpoints import load_generator

        device = _device(args.device)
        base, toon = load_generator(style.base, device), load_generator(style.toon, device)
        ds.check_generator(toon)
        ws = direction.apply(seed_latents(base, [args.seed], truncation=args.truncation), args.strength)
        _save_image(make_grid(render(blend(base, toon, style.blend), ws), columns=1, pad=0), out)
        print(f"wrote {out}: seed {args.seed}, {direction.describe()}, strength {args.strength:g} std", file=sys.stderr)
        return 0

    from gan.cli import TerminalProgress
    from gan.imageio import load_image
    from gan.pipeline import MODES, Toonifier, to_tensor

    modes = None if args.steps is None else {args.mode: replace(MODES[args.mode], steps=args.steps)}
    toonifier = Toonifier.from_files(
        style.base, style.toon, encoder_path=style.encoder, spec=style.blend, device=args.device,
        min_face_size=args.min_face_size, modes=modes,
    )  # fmt: skip
    ds.check_generator(toonifier.toon)
    image = load_image(args.photo)
    aligned = list(toonifier.align(image, all_faces=args.all_faces))
    latents, _ = toonifier.project(
        to_tensor([a.image for a in aligned], toonifier.device), args.mode, progress=TerminalProgress()
    )
    crops = toonifier.render(direction.apply(latents, args.strength))
    composite = toonifier.composite(image, aligned, crops)
    _save_image(composite, out)
    for i, crop in enumerate(crops):
        crop.save(out.with_name(f"{out.stem}_toon{i}.png"))
    print(
        f"wrote {out} and {len(crops)} toon crop(s): {direction.describe()}, strength {args.strength:g} std",
        file=sys.stderr,
    )
    return 0


# ----------------------------------------------------------------------------------------------------------
# mix / sweep / interpolate


def cmd_mix(args: argparse.Namespace) -> int:
    seeds = parse_seeds(args.seeds)
    if len(seeds) < 2:
        raise ValueError("style mixing needs two seeds or more: --seeds A,B[,C…]")
    _image_path(args.out)
    mapper, renderer, label = _style_generators(args)
    layers = parse_layers(renderer, args.layers)
    ws = seed_latents(mapper, seeds, truncation=args.truncation)
    # One row per donor: A, the donor B, and A with B's rows at the chosen layers.
    rows = [torch.cat([ws[:1], ws[k : k + 1], mix_styles(ws[:1], ws[k : k + 1], layers)]) for k in range(1, len(ws))]
    out = _save_image(make_grid(render(renderer, torch.cat(rows)), columns=3), args.out)
    print(f"wrote {out}: seed {seeds[0]} with W+ layers {args.layers} of seeds {seeds[1:]} ({label})", file=sys.stderr)
    return 0


def _write_frames(frames: list, out: Path, duration_ms: int) -> Path:
    if out.suffix.lower() in ANIMATION_SUFFIXES:
        return save_animation(frames, out, duration_ms=duration_ms)
    from PIL import Image

    sheet = Image.new("RGB", (sum(f.width for f in frames), max(f.height for f in frames)), "white")
    x = 0
    for f in frames:
        sheet.paste(f, (x, 0))
        x += f.width
    return _save_image(sheet, out)


def cmd_sweep(args: argparse.Namespace) -> int:
    from gan.checkpoints import load_generator

    out = Path(args.out)
    if out.suffix.lower() not in ANIMATION_SUFFIXES + IMAGE_SUFFIXES:
        raise ValueError(f"write the sweep as .gif or .webp (or a .png contact sheet), not {out.name!r}")
    device = _device(args.device)
    base, toon = load_generator(args.base, device), load_generator(args.toon, device)
    ws = seed_latents(base, [args.seed], truncation=args.truncation)
    frames = blend_sweep_frames(base, toon, ws, structure_from=args.structure_from)
    _write_frames(frames, out, args.duration_ms)
    print(
        f"wrote {out}: {len(frames)} frames, swap from 4px to {base.resolution}px "
        f"(structure from {args.structure_from}), seed {args.seed}",
        file=sys.stderr,
    )
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    seeds = parse_seeds(args.seeds)
    if len(seeds) < 2:
        raise ValueError("interpolation needs two seeds or more: --seeds A,B[,C…]")
    if args.steps < 2:
        raise ValueError(f"--steps must be >= 2, got {args.steps}")
    out = Path(args.out)
    if out.suffix.lower() not in ANIMATION_SUFFIXES + IMAGE_SUFFIXES:
        raise ValueError(f"write the interpolation as .gif/.webp (animation) or .png/.jpg (grid), not {out.name!r}")
    mapper, renderer, label = _style_generators(args)
    ws = seed_latents(mapper, seeds, truncation=args.truncation)
    segments = [interpolate(ws[k], ws[k + 1], args.steps) for k in range(len(ws) - 1)]
    if out.suffix.lower() in ANIMATION_SUFFIXES:
        # One path A→B→C…: each segment's first frame is the previous one's last.
        path = torch.cat([segments[0], *[s[1:] for s in segments[1:]]])
        frames = [make_grid(img[None], columns=1, pad=0) for img in render(renderer, path)]
        save_animation(frames, out, duration_ms=args.duration_ms)
        what = f"{len(frames)} frames"
    else:  # one row per segment
        _save_image(make_grid(render(renderer, torch.cat(segments)), columns=args.steps), out)
        what = f"{len(segments)} row(s) of {args.steps}"
    print(f"wrote {out}: {what} through seeds {seeds} ({label})", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------------------
# Parsers


def _layers_help(default: str) -> str:
    return f"coarse (4-8px), middle (16-32px), fine (64px+), all, or W+ indices like 0-3,7 (default {default})"


def _add_common(s: argparse.ArgumentParser, *, truncation: bool = True) -> None:
    s.add_argument("--models-dir", help="folder with manifest.json (default: $TOONIFY_MODELS_DIR or the demo)")
    if truncation:
        s.add_argument("--truncation", type=float, default=1.0, help="truncation ψ of seeded faces (1: none)")
    s.add_argument("--device")


def add_directions_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = subparsers.add_parser("directions", help="find semantic directions of a style (GANSpace or SeFa)")
    s.add_argument("style", help="a style of the manifest (directions for its toon model), or a checkpoint file")
    s.add_argument("--method", choices=METHODS, default="ganspace")
    s.add_argument("--out", help=f"directions file (*.safetensors; default with --register: STYLE{DIRECTIONS_SUFFIX})")
    s.add_argument("--register", action="store_true", help="list the file as the style's directions in the manifest")
    s.add_argument("--top", type=int, default=16, help="how many components to keep (16)")
    s.add_argument("--samples", type=int, default=10_000, help="sampled w for PCA and the std (10000)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sampled w")
    s.add_argument(
        "--layers", default="all", help="SeFa: layers to factorise; preview: layers edited. " + _layers_help("all")
    )
    s.add_argument("--preview", help="write a grid: rows = components, columns = strengths (*.png)")
    s.add_argument("--preview-seeds", default="0", help="seeded faces in the preview (0)")
    s.add_argument(
        "--preview-strengths",
        default="-3,-1.5,0,1.5,3",
        help="strengths in std; write --preview-strengths=-3,0,3 (default -3,-1.5,0,1.5,3)",
    )
    _add_common(s)
    s.set_defaults(func=cmd_directions)
    return s


def add_name_direction_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = subparsers.add_parser("name-direction", help="name a component of a directions file, with its layers")
    s.add_argument("dirs", help="a directions file, or a style name (its directions file)")
    s.add_argument("index", type=int, help="component index (a row of the preview grid)")
    s.add_argument("name", help="e.g. smile (a letter, then letters, digits, - or _)")
    s.add_argument("--layers", default="all", help="layers the edit moves: " + _layers_help("all"))
    s.add_argument("--register", metavar="STYLE", help="also list the file as STYLE's directions in the manifest")
    s.add_argument("--models-dir", help="folder with manifest.json (default: $TOONIFY_MODELS_DIR or the demo)")
    s.set_defaults(func=cmd_name_direction)
    return s


def add_list_directions_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = subparsers.add_parser("list-directions", help="show a directions file or a style's directions")
    s.add_argument("target", nargs="?", help="a directions file or a style (default: the manifest's default style)")
    s.add_argument("--models-dir", help="folder with manifest.json (default: $TOONIFY_MODELS_DIR or the demo)")
    s.set_defaults(func=cmd_list_directions)
    return s


def add_edit_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = subparsers.add_parser("edit", help="move a photo's toon or a seeded face along a named direction")
    s.add_argument("photo", nargs="?", help="a photo (aligned and projected as `toonify toon` does)")
    s.add_argument("--seed", type=int, help="edit a generated face instead of a photo")
    s.add_argument("--direction", required=True, help="a named direction or a component index")
    s.add_argument("--strength", type=float, required=True, help="in standard deviations of W along it, e.g. 2 or -1.5")
    s.add_argument("--layers", help="override the direction's layers: " + _layers_help("the direction's"))
    s.add_argument("--style", help="a style of the manifest (default: the manifest's default)")
    s.add_argument("--directions", help="a directions file (default: the style's)")
    s.add_argument("--mode", choices=["fast", "balanced", "quality"], default="balanced", help="projection mode")
    s.add_argument("--steps", type=int, help="projection steps (default: the mode's)")
    s.add_argument("--all-faces", action="store_true", help="every face, not just the largest")
    s.add_argument("--min-face-size", type=int, default=64)
    s.add_argument("--out", required=True, help="*.png: the edited toon (a photo: the photo with toons pasted back)")
    _add_common(s)
    s.set_defaults(func=cmd_edit)
    return s


def _add_model_choice(s: argparse.ArgumentParser) -> None:
    g = s.add_mutually_exclusive_group()
    g.add_argument("--style", help="a style of the manifest, rendered by its blend (default: the default style)")
    g.add_argument("--checkpoint", help="a generator checkpoint instead of a style")


def add_mix_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = subparsers.add_parser("mix", help="style mixing: the first seed with another seed's coarse/middle/fine layers")
    s.add_argument("--seeds", required=True, help="A,B[,C…]: one row per donor: A, B, A with B's layers")
    s.add_argument("--layers", required=True, help="layers taken from the donor: " + _layers_help("none"))
    _add_model_choice(s)
    s.add_argument("--out", required=True, help="grid image (*.png)")
    _add_common(s)
    s.set_defaults(func=cmd_mix)
    return s


def add_sweep_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = subparsers.add_parser("sweep", help="animate the blend of two models, swap level from 4px to full resolution")
    s.add_argument("base", help="base checkpoint")
    s.add_argument("toon", help="toon checkpoint (fine-tuned from the base)")
    s.add_argument("--seed", type=int, default=0, help="the seeded face (0)")
    s.add_argument("--structure-from", choices=["toon", "base"], default="toon")
    s.add_argument("--duration-ms", type=int, default=500, help="time per frame (500)")
    s.add_argument("--out", required=True, help="*.gif or *.webp (a *.png writes the frames side by side)")
    _add_common(s)
    s.set_defaults(func=cmd_sweep)
    return s


def add_interpolate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = subparsers.add_parser("interpolate", help="walk linearly in W+ between seeded faces")
    s.add_argument("--seeds", required=True, help="A,B[,C…]: the path's stops")
    s.add_argument("--steps", type=int, default=8, help="latents per segment, both ends included (8)")
    _add_model_choice(s)
    s.add_argument("--duration-ms", type=int, default=100, help="time per frame of an animation (100)")
    s.add_argument("--out", required=True, help="*.gif or *.webp (animation) or *.png (one row per segment)")
    _add_common(s)
    s.set_defaults(func=cmd_interpolate)
    return s


def add_explore_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register every latent-space command (called once by gan.cli.build_parser)."""
    for add in (
        add_directions_parser,
        add_name_direction_parser,
        add_list_directions_parser,
        add_edit_parser,
        add_mix_parser,
        add_sweep_parser,
        add_interpolate_parser,
    ):
        add(subparsers)
