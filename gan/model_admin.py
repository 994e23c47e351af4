"""``toonify styles …``: from two downloaded checkpoints to a live style, and the folder's upkeep.

``styles add NAME --base B --toon T`` reads both files in any supported format (NVIDIA .pkl, rosinality .pt,
ours), checks that they can be blended and whether the toon was fine-tuned from that base, writes them into
the models folder as ``.safetensors`` (the base named by its content hash, so styles sharing a base share
the file), renders a preview sheet, and lists the style in ``manifest.json`` through
:func:`gan.styles.update_manifest` (validated, atomic). ``list``, ``show``, ``remove`` and ``set-default``
read and edit the same manifest. A running bot sees the change on its next request: the manifest is
re-read whenever the file changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gan.blending import BlendError, BlendSpec, LineageWarning, blend, blend_position, check_compatible
from gan.checkpoints import build_generator, read_checkpoint, write_checkpoint
from gan.checkpoints.common import CheckpointError
from gan.checkpoints.native import native_metadata
from gan.images import make_grid, z_from_seeds
from gan.networks import Generator
from gan.styles import (
    DEFAULT_BLEND,
    DEMO_DIR,
    MODELS_ENV,
    Manifest,
    check_style_name,
    read_manifest,
    relative_to,
    update_manifest,
)

# A fine-tune moves its weights a little from where it started; two independently trained (or initialised)
# networks differ by about their own size (sqrt(2) for independent unit-variance weights). Half way between
# the two leaves room for long fine-tunes and still catches unrelated pairs.
SHARED_BASE_MAX = 0.5
PREVIEW_SEEDS = (0, 1, 2, 3)
PREVIEW_PSI = 0.7  # typical faces, as the fine-tune's blend overview uses


@dataclass(frozen=True)
class LayerDistance:
    position: int  # blend position (gan.blending.blend_position): two per resolution
    resolution: int
    relative: float  # |toon - base| / |base| over the position's parameters


@dataclass(frozen=True)
class PairCheck:
    """Whether a toon model descends from a base model, and the evidence."""

    shares_base: bool
    by: str  # "lineage" (recorded ancestry) or "weights" (the per-layer distance below)
    median_relative: float
    layers: tuple[LayerDistance, ...]

    def describe(self) -> str:
        how = (
            "recorded lineage"
            if self.by == "lineage"
            else f"median per-layer weight distance {self.median_relative:.3f}"
        )
        if self.shares_base:
            return f"the toon model descends from this base ({how})"
        return (f"the toon model does not look fine-tuned from this base ({how}, more than {SHARED_BASE_MAX}); "
                "blends of unrelated models are usually garbage")  # fmt: skip

    def table(self) -> str:
        rows = [f"  {'position':>8}  {'res':>5}  {'|toon-base|/|base|':>18}"]
        rows += [f"  {d.position:>8}  {d.resolution:>5}  {d.relative:>18.4f}" for d in self.layers]
        return "\n".join(rows)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "layers": [asdict(d) for d in self.layers]}


def pair_check(base: Generator, toon: Generator) -> PairCheck:
    """Per blend position, the relative distance of the toon's weights from the base's; raises BlendError when
    the two cannot be blended at all (different architectures)."""
    check_compatible(base, toon)
    sb, st = base.state_dict(), toon.state_dict()
    params = {name for name, _ in base.named_parameters()}
    diff: dict[int, float] = {}
    norm: dict[int, float] = {}
    for name in params:
        pos = blend_position(name)
        if pos is None:
            continue
        b, t = sb[name].float(), st[name].float()
        diff[pos] = diff.get(pos, 0.0) + (t - b).square().sum().item()
        norm[pos] = norm.get(pos, 0.0) + b.square().sum().item()
    layers = tuple(
        LayerDistance(pos, 2 ** (pos // 2 + 2), (diff[pos] / norm[pos]) ** 0.5 if norm[pos] > 0 else float("inf"))
        for pos in sorted(diff)
    )
    median = statistics.median(d.relative for d in layers)
    (hb, ht) = (base.meta.get("content_hash"), toon.meta.get("content_hash"))
    recorded = hb is not None and (hb in (toon.meta.get("ancestors") or ()) or hb == ht)
    if recorded:
        return PairCheck(True, "lineage", median, layers)
    return PairCheck(median <= SHARED_BASE_MAX, "weights", median, layers)


def preview_sheet(base: Generator, toon: Generator, path: Path, seeds: tuple[int, ...] = PREVIEW_SEEDS) -> Path:
    """A grid: one row per seed; columns base, the swap at each resolution from 8 px to half the model's, toon.
    Rendered as the pipeline renders (the base model's W, constant noise)."""
    from gan.finetune import render  # the fine-tune's renderer: z through the base mapping, constant noise

    z = z_from_seeds(list(seeds), base.z_dim)
    columns = [render(base, z, psi=PREVIEW_PSI)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LineageWarning)  # the pair check has already said what it found
        for r in swap_resolutions(base.resolution):
            G = blend(base, toon, BlendSpec(mode="swap", resolution=r, structure_from="toon"))
            columns.append(render(G, z, psi=PREVIEW_PSI, mapping_from=base))
    columns.append(render(toon, z, psi=PREVIEW_PSI, mapping_from=base))
    grid = torch.stack(columns, dim=1).flatten(0, 1)  # row-major: seed by seed
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(grid, columns=len(columns)).save(path)
    return path


def swap_resolutions(resolution: int) -> list[int]:
    return [2**i for i in range(3, resolution.bit_length() - 1)]  # 8 … resolution / 2


def default_blend_for(resolution: int) -> BlendSpec:
    """The default blend (swap at 32 px), lowered for models too small for it."""
    r = min(DEFAULT_BLEND.resolution or 32, max(8, resolution // 2))
    return BlendSpec(mode="swap", resolution=r, structure_from="toon")


@dataclass(frozen=True)
class AddedStyle:
    name: str
    base: Path
    toon: Path
    encoder: Path | None
    preview: Path | None
    check: PairCheck
    blend: BlendSpec
    manifest: Manifest


def _writable_dir(directory: str | Path | None) -> Path:
    """The folder to write: the one given, else $TOONIFY_MODELS_DIR; never the bundled demo inside the package."""
    chosen = directory or os.environ.get(MODELS_ENV)
    if not chosen:
        raise ValueError(f"give --models-dir DIR or set {MODELS_ENV}: the bundled demo folder is not for new styles")
    path = Path(chosen)
    if path.resolve() == DEMO_DIR.resolve():
        raise ValueError(f"{path} is the bundled demo folder inside the package; use a folder of your own")
    return path


def _load(path: str | Path, role: str, device: str) -> tuple[Generator, Any]:
    try:
        data = read_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"{role} checkpoint: {e}") from e
    return build_generator(data, device), data


def add_style(
    directory: str | Path | None,
    name: str,
    base_path: str | Path,
    toon_path: str | Path,
    *,
    encoder_path: str | Path | None = None,
    blend_resolution: int | None = None,
    make_default: bool = False,
    replace: bool = False,
    preview_seeds: tuple[int, ...] | None = PREVIEW_SEEDS,
    device: str = "cpu",
    command: list[str] | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> AddedStyle:
    """Convert, check, preview and list a style (see the module doc). Nothing is listed until every file is
    written; a failure leaves the manifest as it was."""
    check_style_name(name)
    directory = _writable_dir(directory)
    if (directory / "manifest.json").exists() and name in read_manifest(directory).styles and not replace:
        raise ValueError(f"style {name!r} is already in {directory}; pass --replace to overwrite it")
    base, base_data = _load(base_path, "base", device)
    toon, toon_data = _load(toon_path, "toon", device)
    try:
        check = pair_check(base, toon)
    except BlendError as e:
        raise ValueError(f"these two cannot be blended: {e}") from None
    say(check.describe())
    if not check.shares_base:
        say("per-layer evidence:\n" + check.table())
    spec = (default_blend_for(base.resolution) if blend_resolution is None
            else BlendSpec(mode="swap", resolution=blend_resolution, structure_from="toon"))  # fmt: skip
    spec.layer_weights(base.resolution)  # a blend finer than the model: refused here, not at the first /toon
    if encoder_path is not None:
        from gan.encoder import load_encoder

        load_encoder(encoder_path, base)  # EncoderMismatchError (a ValueError): trained for another base

    directory.mkdir(parents=True, exist_ok=True)  # every check passed: from here on, files are written

    base_hash = base.meta["content_hash"]
    base_file = _existing_base(directory, base_hash) or directory / f"base-{base_hash[:12]}.safetensors"
    if not base_file.exists():  # the name is the content: an existing file already holds these weights
        base_data.meta.update(source=_source(base_path, base_data))
        write_checkpoint(base_data, base_file, "native")
    toon_data.meta.update(source=_source(toon_path, toon_data))
    if check.shares_base and check.by == "weights":  # record what the weights showed: blending will not warn
        toon_data.meta["ancestors"] = sorted({*(toon_data.meta.get("ancestors") or ()), base_hash})
        toon_data.meta["ancestry"] = f"inferred by `toonify styles add` ({check.describe()})"
    toon_file = write_checkpoint(toon_data, directory / f"{name}.toon.safetensors", "native")

    encoder_file = _place_encoder(encoder_path, directory, base_hash) if encoder_path else None
    preview = None
    if preview_seeds:
        preview = preview_sheet(base, toon, directory / "previews" / f"{name}.png", preview_seeds)
        say(f"preview sheet: {preview} (rows: seeds {','.join(map(str, preview_seeds))}; columns: base, swap at "
            f"{', '.join(f'{r}px' for r in swap_resolutions(base.resolution))}, toon)")  # fmt: skip

    def change(data: dict[str, Any]) -> None:
        entry: dict[str, Any] = {
            "base": relative_to(base_file, directory),
            "toon": relative_to(toon_file, directory),
            "blend": spec.to_json(),
            "base_hash": base_hash,
            "toon_hash": toon.meta["content_hash"],
            "resolution": base.resolution,
            "pair_check": {"shares_base": check.shares_base, "by": check.by,
                           "median_relative": round(check.median_relative, 6)},
            "added_by": command or [],
        }  # fmt: skip
        encoder = encoder_file or _known_encoder(data, directory, base_hash)
        if encoder is not None:
            entry["encoder"] = relative_to(encoder, directory)
        else:
            entry["encoder"] = None  # not the top-level one: that was trained for whatever base sits there
        if preview is not None:
            entry["preview"] = relative_to(preview, directory)
        if not data.get("base"):  # a new folder: this base becomes the one fine-tunes start from
            data["base"] = entry["base"]
            if entry["encoder"]:
                data["encoder"] = entry["encoder"]
        data.setdefault("styles", {})[name] = entry
        if make_default or not data.get("default_style"):
            data["default_style"] = name

    manifest = update_manifest(directory, change, create=True)
    style = manifest.styles[name]
    return AddedStyle(name, style.base, style.toon, style.encoder, preview, check, spec, manifest)


def _source(path: str | Path, data: Any) -> dict[str, Any]:
    return {"file": Path(path).name, "format": data.source_format}


def _place_encoder(path: str | Path, directory: Path, base_hash: str) -> Path:
    dest = directory / f"encoder-{base_hash[:12]}.safetensors"
    if Path(path).resolve() != dest.resolve():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(dest)
    return dest


def _native_hash(path: Path) -> str | None:
    try:
        return native_metadata(path).get("content_hash")
    except CheckpointError:  # not ours, or missing: it cannot be the same file
        return None


def _existing_base(directory: Path, base_hash: str) -> Path | None:
    """A base file the folder already lists with these weights (read from headers only), so none is copied."""
    if not (directory / "manifest.json").exists():
        return None
    manifest = read_manifest(directory)
    for path in dict.fromkeys(p for p in (manifest.base, *(s.base for s in manifest.styles.values())) if p):
        if path.is_file() and _native_hash(path) == base_hash:
            return path
    return None


def _known_encoder(data: dict[str, Any], directory: Path, base_hash: str) -> Path | None:
    """An encoder the folder already uses for the same base (another style's, or the top-level one), if any."""
    for entry in data.get("styles", {}).values():
        if entry.get("base_hash") == base_hash and entry.get("encoder"):
            return directory / entry["encoder"]
    if data.get("base") and data.get("encoder") and _native_hash(directory / data["base"]) == base_hash:
        return directory / data["encoder"]
    default = directory / f"encoder-{base_hash[:12]}.safetensors"
    return default if default.exists() else None


def set_style_encoder(directory: str | Path, base_hash: str, encoder: Path) -> Manifest:
    """Give every style on the base ``base_hash`` (and the folder, when it is the top-level base) ``encoder``."""
    directory = Path(directory)

    def change(data: dict[str, Any]) -> None:
        rel = relative_to(encoder, directory)
        for entry in data.get("styles", {}).values():
            if entry.get("base_hash") == base_hash:
                entry["encoder"] = rel
                if entry.get("base") == data.get("base"):
                    data["encoder"] = rel

    return update_manifest(directory, change)


def remove_style(directory: str | Path | None, name: str, *, delete_files: bool = False) -> list[Path]:
    """Take ``name`` out of the manifest; with ``delete_files``, also delete the files no other entry names.
    Returns the files deleted."""
    directory = _writable_dir(directory)
    removed: dict[str, Any] = {}

    def change(data: dict[str, Any]) -> None:
        styles = data.get("styles", {})
        if name not in styles:
            raise ValueError(f"there is no style {name!r} in {directory}; there are: {', '.join(styles) or 'none'}")
        removed.update(styles.pop(name))
        if data.get("default_style") == name:
            data["default_style"] = next(iter(sorted(styles)), None)

    manifest = update_manifest(directory, change)
    if not delete_files:
        return []
    still = {p.resolve() for s in manifest.styles.values() for p in s.files().values()}
    still |= {p.resolve() for p in (manifest.base, manifest.encoder) if p is not None}
    gone = []
    for key in ("base", "toon", "encoder", "preview", "directions"):
        rel = removed.get(key)
        if rel and (directory / rel).resolve() not in still and (directory / rel).is_file():
            (directory / rel).unlink()
            gone.append(directory / rel)
    for st in removed.get("students", []):
        p = directory / st["file"]
        if p.is_file() and p.resolve() not in still:
            p.unlink()
            gone.append(p)
    return gone


def set_default_style(directory: str | Path | None, name: str) -> Manifest:
    directory = _writable_dir(directory)

    def change(data: dict[str, Any]) -> None:
        if name not in data.get("styles", {}):
            raise ValueError(f"there is no style {name!r} in {directory}")
        data["default_style"] = name

    return update_manifest(directory, change)


def _resolution(path: Path) -> int | None:
    try:
        return int(native_metadata(path)["generator"]["resolution"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None


def style_report(manifest: Manifest, name: str) -> dict[str, Any]:
    """What ``styles show`` prints: the entry, and each file with whether it is there and its size."""
    style = manifest.style(name)
    files = {role: {"path": str(p), "exists": p.is_file(), "bytes": p.stat().st_size if p.is_file() else None}
             for role, p in style.files().items()}  # fmt: skip
    return {
        "name": style.name,
        "default": manifest.default_style == style.name,
        "blend": style.blend.describe(),
        "resolution": style.raw.get("resolution") or _resolution(style.base),
        "pair_check": style.raw.get("pair_check"),
        "preview": style.raw.get("preview"),
        "files": files,
        "modes": [m for m, ok in (("instant", style.student_for()), ("fast", style.encoder)) if ok]
        + ["balanced", "quality"],
    }


# ---------------------------------------------------------------------------------------------- commands


def cmd_styles_add(args: argparse.Namespace) -> int:
    say = lambda line: print(line, file=sys.stderr)  # noqa: E731
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    seeds = None if args.no_preview else tuple(int(s) for s in args.preview_seeds.split(","))
    added = add_style(
        args.models_dir, args.name, args.base, args.toon, encoder_path=args.encoder, blend_resolution=args.blend,
        make_default=args.default, replace=args.replace, preview_seeds=seeds, device=device,
        command=["toonify", "styles", "add", args.name, "--base", Path(args.base).name, "--toon", Path(args.toon).name],
        say=say,
    )  # fmt: skip
    if args.train_encoder and added.encoder is None:
        added = _train_encoder_for(added, args, device, say)
    print(f"added style {added.name!r} to {added.manifest.directory / 'manifest.json'}: {added.blend.describe()}")
    if added.encoder is None:
        say("no encoder for this base: fast mode is unavailable, and balanced/quality start from the average face "
            "(slower to converge). Train one with --train-encoder, or `toonify train-encoder`.")  # fmt: skip
    return 0


def _train_encoder_for(added: AddedStyle, args: argparse.Namespace, device: str, say) -> AddedStyle:
    from gan.checkpoints import load_generator
    from gan.encoder import save_encoder, train_encoder

    G = load_generator(added.base, device)
    out = added.manifest.directory / f"encoder-{G.meta['content_hash'][:12]}.safetensors"
    every = max(1, args.encoder_steps // 20)

    def progress(step: int, total: int, loss: float) -> None:
        if step % every == 0 or step == total:
            say(f"  encoder step {step}/{total}  loss {loss:.4f}")

    snapshot = out.with_name(out.name + ".snapshot")  # a killed add resumes its encoder training when run again
    try:
        enc = train_encoder(G, steps=args.encoder_steps, progress=progress, snapshot_path=snapshot, resume=True)
    except (ValueError, CheckpointError) as e:  # a snapshot of other settings: start over rather than refuse
        say(f"not resuming the encoder training ({e})")
        enc = train_encoder(G, steps=args.encoder_steps, progress=progress, snapshot_path=snapshot, resume=False)
    save_encoder(enc, out, G)
    snapshot.unlink(missing_ok=True)
    manifest = set_style_encoder(added.manifest.directory, G.meta["content_hash"], out)
    say(f"trained and listed the encoder {out}")
    return dataclasses.replace(added, encoder=out, manifest=manifest)


def _manifest_for(args: argparse.Namespace) -> Manifest:
    return read_manifest(Path(args.models_dir) if args.models_dir else None)


def cmd_styles_list(args: argparse.Namespace) -> int:
    manifest = _manifest_for(args)
    rows = [style_report(manifest, name) for name in manifest.styles]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{manifest.directory / 'manifest.json'} (schema {manifest.schema_version})")
    for r in rows:
        missing = [role for role, f in r["files"].items() if not f["exists"]]
        state = "ok" if not missing else f"MISSING {', '.join(missing)}"
        print(f"{'*' if r['default'] else ' '} {r['name']:<20} {r['resolution'] or '?'!s:>5}px  "
              f"{', '.join(r['modes']):<32} {state}")  # fmt: skip
    return 0


def cmd_styles_show(args: argparse.Namespace) -> int:
    report = style_report(_manifest_for(args), args.name)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        if key == "files":
            for role, f in value.items():
                size = f"{f['bytes'] / 1e6:.1f} MB" if f["exists"] else "MISSING"
                print(f"  {role:<24} {f['path']}  ({size})")
        else:
            print(f"{key}: {value}")
    return 0


def cmd_styles_remove(args: argparse.Namespace) -> int:
    gone = remove_style(args.models_dir, args.name, delete_files=args.delete_files)
    print(f"removed style {args.name!r}" + (f"; deleted {', '.join(p.name for p in gone)}" if gone else ""))
    return 0


def cmd_styles_set_default(args: argparse.Namespace) -> int:
    set_default_style(args.models_dir, args.name)
    print(f"default style: {args.name}")
    return 0


def add_styles_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = subparsers.add_parser("styles", help="add, list, show, remove styles of a models folder")
    sub = s.add_subparsers(dest="styles_command", required=True)
    folder = dict(help=f"models folder (default: ${MODELS_ENV}; the bundled demo for reading only)")

    a = sub.add_parser("add", help="turn a base and a toon checkpoint (.pkl/.pt/.safetensors) into a style")
    a.add_argument("name", help="style name: a-z, 0-9, '-', '_' (what /style takes)")
    a.add_argument("--base", required=True, help="the base face model the toon was fine-tuned from")
    a.add_argument("--toon", required=True, help="the fine-tuned toon model")
    a.add_argument("--encoder", help="an encoder trained for this base (toonify train-encoder)")
    a.add_argument("--blend", type=int, help="default swap resolution (default 32, lower for small models)")
    a.add_argument("--models-dir", **folder)
    a.add_argument("--default", action="store_true", help="make it the folder's default style")
    a.add_argument("--replace", action="store_true", help="overwrite a style of the same name")
    a.add_argument("--preview-seeds", default=",".join(map(str, PREVIEW_SEEDS)), help="seeds of the preview sheet")
    a.add_argument("--no-preview", action="store_true", help="skip the preview sheet")
    a.add_argument("--train-encoder", action="store_true", help="train an encoder for the base when it has none")
    a.add_argument("--encoder-steps", type=int, default=2000, help="steps of that training")
    a.add_argument("--device")
    a.set_defaults(func=cmd_styles_add)

    for name, func, helptext in (
        ("list", cmd_styles_list, "the folder's styles, their modes and missing files"),
        ("show", cmd_styles_show, "one style: blend, pair check, files"),
    ):
        c = sub.add_parser(name, help=helptext)
        if name == "show":
            c.add_argument("name")
        c.add_argument("--models-dir", **folder)
        c.add_argument("--json", action="store_true")
        c.set_defaults(func=func)

    r = sub.add_parser("remove", help="take a style out of the manifest")
    r.add_argument("name")
    r.add_argument("--models-dir", **folder)
    r.add_argument("--delete-files", action="store_true", help="also delete its files that no other entry uses")
    r.set_defaults(func=cmd_styles_remove)

    d = sub.add_parser("set-default", help="the style a request without one gets")
    d.add_argument("name")
    d.add_argument("--models-dir", **folder)
    d.set_defaults(func=cmd_styles_set_default)
    return s
