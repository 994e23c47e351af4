"""`toonify weights check`: the local perceptual-loss weight files, verified, and the loss they give.

For each configured file (``--vgg``/``--lpips``, else ``TOONIFY_VGG16_PATH``/``TOONIFY_LPIPS_PATH``): that it
exists, loads the way :func:`gan.perceptual.load_tensors` loads it (``weights_only``: a pickle that would run
code is refused, never run), has every tensor the loss needs with the right shape, its sha256 and whether that
is a published release. Then which loss projection and distillation will use, decided by
:func:`gan.perceptual.perceptual_choice` (the function :func:`~gan.perceptual.build_perceptual_loss` decides
with) and confirmed by building it. Exit status 0 when everything configured is usable (an unknown hash is a
warning), 1 when a configured file is not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gan.perceptual import (
    LPIPS_ENV,
    LPIPS_SOURCE,
    VGG16,
    VGG_ENV,
    VGG_IGNORED_PREFIX,
    VGG_SOURCE,
    PerceptualWeightsError,
    PerceptualWeightsMissing,
    _LinLayers,
    build_perceptual_loss,
    configured_paths,
    load_tensors,
    perceptual_choice,
)

# torch.hub.load_state_dict_from_url(check_hash=True) reads a file named ``name-<hex>.ext`` as "<hex> is the first
# eight or more hex digits of the file's SHA-256", and torchvision names its downloads that way: so what is
# published about vgg16-397923af.pth is that its sha256 starts with 397923af (a prefix match, not a full hash).
VGG16_SHA256_PREFIX = "397923af"
# sha256 of lpips/weights/v0.1/vgg.pth in github.com/richzhang/PerceptualSimilarity, computed from the file in that
# repository (git blob 47e943cf, 7289 bytes, unchanged since commit c33f89e of 2020; read at 082bb24f, 2023-12-19);
# its setup.py ships that file in the lpips pip package (package_data "weights/v0.1/*.pth"). Its MD5 is
# d507d7349b931f0638a25a48a722f98a, the value CompVis/taming-transformers' taming/util.py (MD5_MAP["vgg_lpips"])
# checks for the vgg.pth it downloads; third-party download scripts pin this same sha256.
LPIPS_V01_VGG_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"

LOSS_DESCRIPTIONS = {
    "lpips-vgg16": "LPIPS (VGG16 trunk + LPIPS v0.1 lin weights)",
    "vgg16-features": "VGG16 features (LPIPS without its lin weights: the unweighted baseline)",
    "d-features": "discriminator features + pixel terms (no VGG16/LPIPS files configured)",
    "pixel": "pixel terms only (no VGG16/LPIPS files configured and no discriminator)",
}


@dataclass
class FileReport:
    """One weight file: ``status`` is ok, warning (usable, not a known release), error or not configured."""

    what: str
    path: str | None
    source: str | None  # the flag or environment variable the path came from
    status: str
    message: str
    sha256: str | None = None
    bytes: int | None = None
    known_release: str | None = None
    tensors: int | None = None


@dataclass(frozen=True)
class _Kind:
    what: str
    env: str
    flag: str
    module: type[torch.nn.Module]
    ignored_prefix: str | None
    shapes_name: str  # what matching shapes means, in the report

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):  # names and shapes only: nothing allocated
            module = self.module()
        return {k: tuple(v.shape) for k, v in module.state_dict().items()}


VGG_KIND = _Kind("VGG16", VGG_ENV, "--vgg", VGG16, VGG_IGNORED_PREFIX, "torchvision VGG16 features")
LPIPS_KIND = _Kind("LPIPS", LPIPS_ENV, "--lpips", _LinLayers, None, "LPIPS v0.1")


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def known_release(kind: _Kind, sha256: str) -> tuple[str, str] | None:
    """(release name, why the hash says so) when ``sha256`` is a published file's, else None."""
    if kind is VGG_KIND and sha256.startswith(VGG16_SHA256_PREFIX):
        name = f"torchvision vgg16-{VGG16_SHA256_PREFIX}.pth"
        return name, f"sha256 starts with {VGG16_SHA256_PREFIX}, the prefix the name of {name} records"
    if kind is LPIPS_KIND and sha256 == LPIPS_V01_VGG_SHA256:
        name = "LPIPS v0.1 vgg.pth"
        return name, f"sha256 is that of {name} (richzhang/PerceptualSimilarity, the lpips package)"
    return None


def _swapped_hint(sd: dict[str, torch.Tensor], kind: _Kind) -> str:
    other = LPIPS_KIND if kind is VGG_KIND else VGG_KIND
    if all(k in sd for k in other.expected_shapes()):
        return f" (it holds the {other.what} file's keys: are {VGG_KIND.flag} and {LPIPS_KIND.flag} swapped?)"
    return ""


def first_shape_problem(sd: dict[str, torch.Tensor], kind: _Kind) -> str | None:
    """The first missing or mis-shaped tensor (expected vs actual shape), else the first unexpected key."""
    expected = kind.expected_shapes()
    for key, shape in expected.items():
        if key not in sd:
            return f"missing {key} (expected shape {list(shape)}){_swapped_hint(sd, kind)}"
        if tuple(sd[key].shape) != shape:
            return f"{key} has shape {list(sd[key].shape)}, expected {list(shape)}"
    extra = [k for k in sd if k not in expected and not (kind.ignored_prefix and k.startswith(kind.ignored_prefix))]
    if extra:
        return f"unexpected key {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    return None


def check_file(kind: _Kind, path: Path | None, source: str | None) -> FileReport:
    report = FileReport(kind.what, None if path is None else str(path), None, "not configured", "")
    if path is None:
        report.message = f"set {kind.flag} or {kind.env}"
        return report
    report.source, report.status = source, "error"
    if not path.is_file():
        report.message = "does not exist" if not path.exists() else "is not a file"
        return report
    try:
        report.bytes, report.sha256 = path.stat().st_size, sha256_of(path)
        sd = load_tensors(path, kind.what, kind.env)
    except (PerceptualWeightsError, PerceptualWeightsMissing, OSError) as e:
        report.message = str(e).splitlines()[0]
        return report
    except Exception as e:  # whatever else a damaged file makes torch.load raise is this file's failure, not a crash
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        report.message = f"cannot be read: {type(e).__name__}" + (f": {detail}" if detail else "")
        return report
    problem = first_shape_problem(sd, kind)
    if problem is not None:
        report.message = f"does not match {kind.shapes_name}: {problem}"
        return report
    report.tensors = sum(1 for k in sd if not (kind.ignored_prefix and k.startswith(kind.ignored_prefix)))
    release = known_release(kind, report.sha256)
    if release is not None:
        report.known_release = release[0]
        report.status, report.message = "ok", f"shapes match {kind.shapes_name}; {release[1]}"
    else:
        published = f"prefix {VGG16_SHA256_PREFIX}" if kind is VGG_KIND else f"{LPIPS_V01_VGG_SHA256[:12]}…"
        report.status = "warning"
        report.message = (
            f"shapes match {kind.shapes_name}; sha256 is not the published file's ({published}): usable, but "
            "distances will differ from the published weights'"
        )
    return report


def _discriminator(checkpoint: Path) -> dict:
    """Whether ``checkpoint`` holds a discriminator, found out as the pipeline does (load it, CheckpointError: no)."""
    from gan.checkpoints import CheckpointError, load_discriminator

    try:
        D = load_discriminator(checkpoint)
    except CheckpointError as e:
        return {"checkpoint": str(checkpoint), "available": False, "reason": str(e).splitlines()[0]}
    return {"checkpoint": str(checkpoint), "available": True, "resolution": D.resolution}


def _use(loss: str | None, discriminator: dict | None, refused: str | None) -> dict:
    if loss is None:
        description = f"build_perceptual_loss refuses ({refused}); a configured file is never skipped"
    else:
        description = LOSS_DESCRIPTIONS[loss]
    return {"loss": loss, "description": description, "discriminator": discriminator}


def weights_report(
    vgg_path: str | None = None,
    lpips_path: str | None = None,
    *,
    models_dir: str | Path | None = None,
    style: str | None = None,
) -> dict:
    """The whole check as a JSON-ready dict; ``report["ok"]`` is False when a configured file is unusable."""
    vgg, lin = configured_paths(vgg_path, lpips_path)
    files = {
        "vgg": check_file(VGG_KIND, vgg, VGG_KIND.flag if vgg_path is not None else VGG_ENV),
        "lpips": check_file(LPIPS_KIND, lin, LPIPS_KIND.flag if lpips_path is not None else LPIPS_ENV),
    }
    if lin is not None and vgg is None:
        files["vgg"].status = "error"
        files["vgg"].message = f"not configured, but the LPIPS file needs it ({files['vgg'].message})"
    report: dict = {"style": None, "models_dir": None}
    ok = all(f.status != "error" for f in files.values())

    # Ask the decision function whether the discriminator matters before reading any model.
    choices = {perceptual_choice(vgg, lin, discriminator_available=d) for d in (True, False)}
    if len(choices) == 1:
        loss, refused = choices.pop(), None
        if ok:
            try:  # build it: the loader's own checks (negative lin weights…) are the last word on "usable"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    build_perceptual_loss(vgg, lin)
            except (PerceptualWeightsError, PerceptualWeightsMissing) as e:
                ok, refused = False, str(e).splitlines()[0]
                for f in files.values():  # the loader names the file it refused
                    if f.path is not None and f.path in refused:
                        f.status, f.message = "error", refused
        else:
            refused = " and ".join(f.what for f in files.values() if f.status == "error") + " unusable"
        use = _use(loss if ok else None, None, refused)
        report["projection"] = report["distillation"] = use
    else:
        from gan.styles import read_manifest

        manifest = read_manifest(Path(models_dir) if models_dir else None)
        chosen = manifest.style(style)
        report["style"], report["models_dir"] = chosen.name, str(manifest.directory)
        # Projection (gan.pipeline, backend.model_cache) uses the base's critic; distillation (gan.distill,
        # backend.distill) the toon's, which knows what toons look like.
        for task, checkpoint in (("projection", chosen.base), ("distillation", chosen.toon)):
            d = _discriminator(checkpoint)
            report[task] = _use(perceptual_choice(vgg, lin, discriminator_available=d["available"]), d, None)
    report["files"], report["ok"] = {k: asdict(v) for k, v in files.items()}, ok
    return report


def format_report(report: dict) -> str:
    lines = []
    for f in report["files"].values():
        where = f": {f['path']} (from {f['source']})" if f["path"] else ""
        lines.append(f"{f['what']}: {f['status']}{where}: {f['message']}")
        if f["sha256"]:
            lines.append(f"  sha256 {f['sha256']} ({f['bytes']} bytes)")
    same = report["projection"] == report["distillation"]
    for task in ("projection",) if same else ("projection", "distillation"):
        use = report[task]
        label = "projection and distillation" if same else task
        line = f"{label}: {use['loss'] or 'none'}: {use['description']}"
        d = use["discriminator"]
        if d is not None:
            held = "holds a discriminator" if d["available"] else f"has no usable discriminator ({d['reason']})"
            line += f"; style {report['style']}: {d['checkpoint']} {held}"
        lines.append(line)
    if any(f["status"] == "not configured" for f in report["files"].values()):
        lines.append(f"weights: {VGG_SOURCE}; {LPIPS_SOURCE}")
    return "\n".join(lines)


def cmd_weights_check(args: argparse.Namespace) -> int:
    report = weights_report(args.vgg, args.lpips, models_dir=args.models_dir, style=args.style)
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def add_weights_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = subparsers.add_parser("weights", help="check the local VGG16/LPIPS weight files")
    sub = s.add_subparsers(dest="weights_command", required=True)
    c = sub.add_parser(
        "check",
        help="verify the configured VGG16/LPIPS files and say which loss projection and distillation use",
        description="Checks each configured weight file (exists, loads without running code, every tensor with "
        "its expected shape, sha256, whether it is the published release) and says which perceptual loss "
        "projection and distillation will use. Exit status 0: everything configured is usable (an unknown hash "
        "is only a warning); 1: a configured file is missing, unreadable or mis-shaped.",
    )
    c.add_argument("--vgg", help=f"torchvision VGG16 weights (default ${VGG_ENV})")
    c.add_argument("--lpips", help=f"LPIPS v0.1 lin weights, vgg.pth (default ${LPIPS_ENV})")
    c.add_argument("--models-dir", help="folder with manifest.json (default: $TOONIFY_MODELS_DIR or the demo)")
    c.add_argument("--style", help="style whose checkpoints' discriminators the fallback uses (default: the default)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=cmd_weights_check)
    return s
