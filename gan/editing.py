"""Exploring the latent space: semantic directions (SeFa, GANSpace), named edits, style mixing, interpolation
and blend sweeps.

**SeFa** (Shen & Zhou, 2021): every modulated layer maps w to per-channel styles with an affine ``A·w + b``; a
direction ``d`` moves the styles by ``A·d``. SeFa stacks the chosen layers' ``A`` (each style unit's weight
vector normalised to unit length, so wide layers do not drown narrow ones), and takes the eigenvectors of
``AᵀA`` with the largest eigenvalues: the unit directions that move the styles most. By default all style
convs are used, as in SeFa and rosinality's ``closed_form_factorization.py`` (which however skips the
normalisation).

**GANSpace** (Härkönen et al., 2020): sample z, map it to w, and take the principal components of the sampled
W. An edit ``E(v_i, start…end)`` moves w along component ``v_i`` in a range of W+ layers only (coarse layers
change pose and shape, fine ones colour and texture); :class:`NamedDirection` keeps that range with the vector.

**Layers** are named by the W+ index they read (``ws[:, i]``), the same indices :func:`apply_direction` edits.
Style conv ``i`` is ``conv1`` for i = 0 and ``convs[i-1]`` after that, so style convs cover indices
0 … num_ws−2 and :func:`ws_resolution` gives each index the resolution of its style conv; the last index is
read only by the last ToRGB, at full resolution. ToRGB layers (``to_rgb1`` reads 1, ``to_rgbs[k]`` reads 2k+3)
join SeFa only with ``include_torgb=True``. :data:`LAYER_GROUPS` names resolution ranges (coarse 4–8 px,
middle 16–32 px, fine 64 px and up); :func:`layer_group` turns one into W+ indices for a generator.

**Strengths** of a :class:`NamedDirection` are in standard deviations of sampled W along the direction
(GANSpace's σ units), whichever method found it: its ``vector`` is the unit direction times that σ, so
``apply_direction(ws, d.vector, 2.0, d.layers)`` is "two σ" on any generator.

**Directions files** (``.safetensors``): tensors ``components`` [K, w_dim] (unit), ``scales`` [K] (σ),
``values`` [K] (explained variance or SeFa eigenvalue) and ``named.<name>`` [w_dim] (the scaled vector); one
JSON metadata entry with the method, the content hash and architecture of the generator they were made for,
and each name's layers and component index. A style's file lives beside its models as
``<models_dir>/<style>.directions.safetensors`` and is listed in the manifest as ``styles.<name>.directions``;
it is made for the style's toon generator.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from gan.networks import Generator

if TYPE_CHECKING:  # Pillow is only needed to render frames
    from PIL import Image

Method = Literal["ganspace", "sefa"]
METHODS: tuple[str, ...] = ("ganspace", "sefa")
DIRECTIONS_KEY = "toonify_directions"
DIRECTIONS_FORMAT_VERSION = 1
DIRECTIONS_SUFFIX = ".directions.safetensors"
# Resolution ranges (inclusive; None = up to the model's resolution) of the W+ layer groups.
LAYER_GROUPS: dict[str, tuple[int, int | None]] = {"coarse": (4, 8), "middle": (16, 32), "fine": (64, None)}
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")


class DirectionsError(ValueError):
    """A directions file is unreadable, malformed, or asked for something it does not hold."""


class DirectionsMismatchError(DirectionsError):
    """A directions file was made for another generator than the one it is used with."""


# ----------------------------------------------------------------------------------------------------------
# Layers


def ws_resolution(index: int) -> int:
    """Output resolution of the style conv that reads ``ws[:, index]``."""
    return 4 if index == 0 else 8 * 2 ** ((index - 1) // 2)


def layers_for_resolutions(G: Generator, low: int = 4, high: int | None = None) -> list[int]:
    """W+ indices of the style convs whose output resolution lies in [low, high] (e.g. 4…16 = coarse)."""
    high = G.resolution if high is None else high
    return [i for i in range(G.num_ws - 1) if low <= ws_resolution(i) <= high]


def _num_ws(resolution: int) -> int:
    return 2 * int(math.log2(resolution)) - 2


def layer_group(G: Generator | int, name: str) -> list[int]:
    """W+ indices of a named group (``coarse``, ``middle``, ``fine`` or ``all``) for a generator (or its
    resolution). Groups take every index whose style conv lies in the range; the last index (only the last
    ToRGB reads it) belongs to the full resolution."""
    resolution = G if isinstance(G, int) else G.resolution
    num_ws = _num_ws(resolution)
    if name == "all":
        return list(range(num_ws))
    if name not in LAYER_GROUPS:
        raise ValueError(f"unknown layer group {name!r}; choose one of {', '.join([*LAYER_GROUPS, 'all'])}")
    low, high = LAYER_GROUPS[name]
    high = resolution if high is None else high
    layers = [i for i in range(num_ws - 1) if low <= ws_resolution(i) <= high]
    if low <= resolution <= high:
        layers.append(num_ws - 1)
    if not layers:
        raise ValueError(f"a {resolution}px generator has no {name} layers ({low} px and up)")
    return layers


def parse_layers(G: Generator | int, spec: str | Sequence[int] | None) -> list[int]:
    """W+ indices from a group name, ``all``/None, a list of ints or text like ``0-3,7`` (checked in range)."""
    resolution = G if isinstance(G, int) else G.resolution
    num_ws = _num_ws(resolution)
    if spec is None:
        return list(range(num_ws))
    if isinstance(spec, str):
        text = spec.strip()
        if text in LAYER_GROUPS or text == "all":
            return layer_group(resolution, text)
        if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", text):
            raise ValueError(
                f"bad layers {spec!r}: give coarse, middle, fine, all, or W+ indices like 0-3,7 (0…{num_ws - 1})"
            )
        layers: list[int] = []
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            layers.extend(range(int(lo), min(int(hi or lo), num_ws) + 1))  # capped: "0-99999999" stays small
        spec = layers
    layers = sorted({int(i) for i in spec})
    bad = [i for i in layers if not 0 <= i < num_ws]
    if bad or not layers:
        raise ValueError(f"layer indices must lie in 0…{num_ws - 1} for a {resolution}px generator, got {list(spec)}")
    return layers


def layer_styles(G: Generator, ws: Tensor) -> dict[str, Tensor]:
    """Every modulated layer's styles ``A·w + b`` for W+ latents [N, num_ws, w_dim], named
    ``conv{res}.{k}`` / ``torgb{res}`` and ordered as synthesis runs them: what an edit changes, layer by layer."""
    if ws.ndim != 3 or ws.shape[1:] != (G.num_ws, G.w_dim):
        raise ValueError(f"ws must be [N, {G.num_ws}, {G.w_dim}], got {list(ws.shape)}")
    ws = ws.to(G.device)
    with torch.no_grad():
        ws = ws.float()  # modulated convs compute their styles in float32
        out = {"conv4.0": G.conv1.conv.modulation(ws[:, 0]), "torgb4": G.to_rgb1.conv.modulation(ws[:, 1])}
        for k, to_rgb in enumerate(G.to_rgbs):
            res, i = 8 * 2**k, 2 * k + 1
            out[f"conv{res}.0"] = G.convs[2 * k].conv.modulation(ws[:, i])
            out[f"conv{res}.1"] = G.convs[2 * k + 1].conv.modulation(ws[:, i + 1])
            out[f"torgb{res}"] = to_rgb.conv.modulation(ws[:, i + 2])
    return out


# ----------------------------------------------------------------------------------------------------------
# Directions


def _modulations(G: Generator, layers: Sequence[int], include_torgb: bool) -> list[Tensor]:
    convs = [G.conv1, *G.convs]  # style conv i reads ws[:, i]
    torgbs = {1: G.to_rgb1, **{2 * k + 3: m for k, m in enumerate(G.to_rgbs)}}
    mods = []
    for i in layers:
        if not 0 <= i < G.num_ws:
            raise ValueError(f"layer index {i} out of range 0…{G.num_ws - 1}")
        if i < len(convs):
            mods.append(convs[i].conv.modulation.weight)
        if include_torgb and i in torgbs:
            mods.append(torgbs[i].conv.modulation.weight)
    return mods


@torch.no_grad()
def sefa_directions(
    G: Generator, layers: Sequence[int] | None = None, top_k: int | None = None, *, include_torgb: bool = False
) -> tuple[Tensor, Tensor]:
    """(directions [K, w_dim], eigenvalues [K]): unit, orthogonal, eigenvalue descending; K = top_k or w_dim."""
    if top_k is not None and not 1 <= top_k <= G.w_dim:
        raise ValueError(f"top_k must be in 1…{G.w_dim}, got {top_k}")
    layers = list(range(G.num_ws - 1)) if layers is None else list(layers)
    mods = _modulations(G, layers, include_torgb)
    if not mods:
        raise ValueError(f"no modulated layers selected by {layers} (include_torgb={include_torgb})")
    # float64 on CPU: eigh of a w_dim x w_dim matrix is cheap and this keeps the basis orthonormal to 1e-12.
    A = torch.cat([m.detach().double().cpu() for m in mods])  # [sum of channels, w_dim]
    A = A / A.norm(dim=1, keepdim=True).clamp_min(1e-12)
    eigvals, eigvecs = torch.linalg.eigh(A.T @ A)  # ascending
    order = eigvals.argsort(descending=True)[: top_k or G.w_dim]
    directions = eigvecs[:, order].T.float().to(G.device)
    return directions, eigvals[order].float().to(G.device)


@torch.no_grad()
def sample_w(G: Generator, n_samples: int = 10_000, seed: int = 0, *, batch: int = 4096) -> Tensor:
    """``n_samples`` seeded w = mapping(z), z ~ N(0, I), without truncation: [n_samples, w_dim] on CPU."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_samples, G.z_dim, generator=g)
    return torch.cat([G.mapping(z[i : i + batch].to(G.device)).float().cpu() for i in range(0, n_samples, batch)])


@torch.no_grad()
def ganspace_directions(G: Generator, n_samples: int = 10_000, top_k: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(directions [K, w_dim], explained variance [K]): the principal components of sampled W, unit,
    orthogonal and variance descending. Each sign is fixed (largest coordinate positive) so a seed always
    gives the same basis."""
    if not 1 <= top_k <= G.w_dim:
        raise ValueError(f"top_k must be in 1…{G.w_dim}, got {top_k}")
    if n_samples < 2:
        raise ValueError(f"PCA needs at least 2 samples, got {n_samples}")
    w = sample_w(G, n_samples, seed).double()
    # The covariance is w_dim x w_dim whatever n_samples is, so exact PCA by eigh replaces the paper's
    # incremental PCA; float64 keeps the components orthonormal to ~1e-12.
    w = w - w.mean(0)
    cov = w.T @ w / (n_samples - 1)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    order = eigvals.argsort(descending=True)[:top_k]
    directions, variance = eigvecs[:, order].T, eigvals[order].clamp_min(0)
    sign = directions.gather(1, directions.abs().argmax(1, keepdim=True)).sign()
    return (directions * sign).float().to(G.device), variance.float().to(G.device)


@torch.no_grad()
def direction_scales(G: Generator, directions: Tensor, n_samples: int = 10_000, seed: int = 0) -> Tensor:
    """Standard deviation of sampled W along each unit direction [K, w_dim] -> [K] (the σ of a strength)."""
    if directions.ndim != 2 or directions.shape[1] != G.w_dim:
        raise ValueError(f"directions must be [K, {G.w_dim}], got {list(directions.shape)}")
    w = sample_w(G, max(n_samples, 2), seed)
    return (w @ directions.float().cpu().T).std(0).to(directions.device)


def apply_direction(
    ws: Tensor, direction: Tensor, strength: float | Tensor, layers: Sequence[int] | None = None
) -> Tensor:
    """``ws`` [N, num_ws, w_dim] moved by ``strength``·``direction`` in the given W+ indices (all by default).

    ``strength`` may be a float or a tensor [N] (one strength per sample). Returns a new tensor."""
    if ws.ndim != 3 or direction.shape != (ws.shape[2],):
        raise ValueError(f"expected ws [N, L, D] and direction [D], got {list(ws.shape)}, {list(direction.shape)}")
    idx = list(range(ws.shape[1])) if layers is None else list(layers)
    step = torch.as_tensor(strength, dtype=ws.dtype, device=ws.device).reshape(-1, 1, 1)
    out = ws.clone()
    out[:, idx] = out[:, idx] + step * direction.to(ws)
    return out


@dataclass(frozen=True)
class NamedDirection:
    """An edit: ``vector`` [w_dim] is the step for strength 1 (unit direction x σ), applied to ``layers``."""

    name: str
    vector: Tensor
    layers: list[int]
    method: str
    index: int | None = None  # the component it came from, if any

    def apply(self, ws: Tensor, strength: float | Tensor) -> Tensor:
        """``ws`` [N, num_ws, w_dim] edited by ``strength`` σ in this direction's layers."""
        return apply_direction(ws, self.vector, strength, self.layers)

    def describe(self) -> str:
        src = f"{self.method} component {self.index}" if self.index is not None else self.method
        return f"{self.name}: {src}, W+ layers {_ranges(self.layers)}"


def _ranges(layers: Sequence[int]) -> str:
    parts, run = [], []
    for i in sorted(layers):
        if run and i != run[-1] + 1:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(i)
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def check_direction_name(name: str) -> str:
    """Names start with a letter (so they never read as a component index) and stay short and plain."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"bad direction name {name!r}: a letter, then up to 31 letters, digits, '-' or '_'")
    return name


def generator_hash(G: Generator) -> str:
    """The generator's content hash (from its file's metadata when loaded from one)."""
    from gan.checkpoints.common import content_hash

    return (getattr(G, "meta", None) or {}).get("content_hash") or content_hash(G.state_dict())


def directions_meta(G: Generator, method: str, **extra: Any) -> dict[str, Any]:
    """The metadata a directions file needs: method, the generator's content hash and architecture."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return {"method": method, "generator_hash": generator_hash(G), "generator": G.config.to_json(), **extra}


@dataclass
class DirectionSet:
    """The contents of a directions file: components (unit) with their σ and values, plus named edits."""

    components: Tensor  # [K, w_dim], unit rows; K may be 0 when only named directions were saved
    scales: Tensor  # [K] standard deviation of sampled W along each component
    values: Tensor  # [K] explained variance (GANSpace) or eigenvalue (SeFa)
    meta: dict[str, Any]
    named: dict[str, NamedDirection] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.meta.get("method", ""))

    @property
    def generator_hash(self) -> str:
        return str(self.meta.get("generator_hash", ""))

    @property
    def resolution(self) -> int:
        return int(self.meta["generator"]["resolution"])

    def __len__(self) -> int:
        return int(self.components.shape[0])

    def component(self, index: int, layers: str | Sequence[int] | None = None) -> NamedDirection:
        """Component ``index`` as an (unnamed) edit on ``layers`` (default: all)."""
        if not 0 <= index < len(self):
            raise DirectionsError(
                f"component index {index} out of range: this file holds {len(self)} (0…{len(self) - 1})"
            )
        vector = self.components[index] * self.scales[index]
        return NamedDirection(f"#{index}", vector, parse_layers(self.resolution, layers), self.method, index)

    def get(self, key: str | int, layers: str | Sequence[int] | None = None) -> NamedDirection:
        """A named direction, or a component by index (an int or digits); ``layers`` overrides its layers."""
        if isinstance(key, str) and key in self.named:
            d = self.named[key]
            if layers is None:
                return d
            return NamedDirection(d.name, d.vector, parse_layers(self.resolution, layers), d.method, d.index)
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            return self.component(int(key), layers)
        names = ", ".join(sorted(self.named)) or "none yet"
        raise DirectionsError(
            f"unknown direction {key!r}; named directions: {names}; or give a component index 0…{len(self) - 1}"
        )

    def check_generator(self, G: Generator | str) -> None:
        """Refuse a generator (or content hash) other than the one these directions were made for."""
        have = G if isinstance(G, str) else generator_hash(G)
        if have != self.generator_hash:
            raise DirectionsMismatchError(
                f"these directions were made for generator {self.generator_hash[:12]}, not {have[:12]}: "
                "a direction only means something in the latent space it was found in; make new ones with "
                "`toonify directions`"
            )


def _as_set(dirs: DirectionSet | dict[str, NamedDirection] | Tensor, meta: dict[str, Any] | None) -> DirectionSet:
    if isinstance(dirs, DirectionSet):
        return DirectionSet(dirs.components, dirs.scales, dirs.values, {**dirs.meta, **(meta or {})}, dict(dirs.named))
    meta = dict(meta or {})
    if isinstance(dirs, Tensor):
        if dirs.ndim != 2:
            raise ValueError(f"directions must be [K, w_dim], got {list(dirs.shape)}")
        k = dirs.shape[0]
        scales = torch.as_tensor(meta.pop("scales", torch.ones(k))).float().reshape(-1)
        values = torch.as_tensor(meta.pop("values", torch.zeros(k))).float().reshape(-1)
        if scales.shape != (k,) or values.shape != (k,):
            raise ValueError(f"scales and values must have one entry per direction ({k})")
        unit = dirs.float() / dirs.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
        return DirectionSet(unit, scales, values, meta)
    if not dirs:
        raise ValueError("nothing to save: no directions")
    w_dim = next(iter(dirs.values())).vector.shape[-1]
    empty = torch.zeros(0, w_dim)
    return DirectionSet(empty, torch.zeros(0), torch.zeros(0), meta, {d.name: d for d in dirs.values()})


def save_directions(
    path: str | Path, dirs: DirectionSet | dict[str, NamedDirection] | Tensor, meta: dict[str, Any] | None = None
) -> Path:
    """Write directions as .safetensors with JSON metadata (atomic). ``meta`` must give (or ``dirs``, a
    :class:`DirectionSet`, already hold) ``method`` and ``generator_hash`` (see :func:`directions_meta`);
    a plain tensor [K, w_dim] may bring ``scales`` and ``values`` in ``meta``."""
    from gan.checkpoints.native import write_tensors_and_metadata

    ds = _as_set(dirs, meta)
    missing = [k for k in ("method", "generator_hash", "generator") if not ds.meta.get(k)]
    if missing:
        raise ValueError(f"directions metadata lacks {', '.join(missing)} (build it with directions_meta(G, method))")
    w_dim = int(ds.meta["generator"]["w_dim"])
    tensors: dict[str, Tensor] = {}
    if len(ds):
        if ds.components.shape[1] != w_dim:
            raise ValueError(f"components are [K, {ds.components.shape[1]}], the generator's w_dim is {w_dim}")
        tensors.update(components=ds.components, scales=ds.scales, values=ds.values)
    names = {}
    for name, d in ds.named.items():
        check_direction_name(name)
        if d.vector.shape != (w_dim,):
            raise ValueError(f"direction {name!r} is {list(d.vector.shape)}, expected [{w_dim}]")
        parse_layers(int(ds.meta["generator"]["resolution"]), d.layers)
        tensors[f"named.{name}"] = d.vector
        names[name] = {"layers": list(d.layers), "method": d.method, "index": d.index}
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    header = {k: v for k, v in ds.meta.items() if k not in ("names", "scales", "values")}
    header.update(format_version=DIRECTIONS_FORMAT_VERSION, names=names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_tensors_and_metadata(tensors, path, header, DIRECTIONS_KEY)


def load_directions(path: str | Path, G: Generator | None = None) -> DirectionSet:
    """Read a directions file; with ``G``, refuse it unless it was made for ``G``
    (:class:`DirectionsMismatchError`)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(DIRECTIONS_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise DirectionsError(f"{path}: not a readable directions file ({e})") from e
    if raw is None:
        raise DirectionsError(
            f"{path}: a safetensors file without directions metadata (not made by toonify directions)"
        )
    try:
        meta = json.loads(raw)
        w_dim, method = int(meta["generator"]["w_dim"]), str(meta["method"])
        names = dict(meta.get("names") or {})
        components = tensors.get("components", torch.zeros(0, w_dim))
        k = components.shape[0]
        scales, values = tensors.get("scales", torch.ones(k)), tensors.get("values", torch.zeros(k))
        named = {
            name: NamedDirection(name, tensors[f"named.{name}"], [int(i) for i in e["layers"]],
                                 str(e.get("method", method)), e.get("index"))
            for name, e in names.items()
        }  # fmt: skip
    except (ValueError, KeyError, TypeError) as e:
        raise DirectionsError(f"{path}: bad directions metadata ({e})") from e
    shapes_ok = all(d.vector.shape == (w_dim,) for d in named.values())
    if (
        components.ndim != 2
        or components.shape[1] != w_dim
        or scales.shape != (k,)
        or values.shape != (k,)
        or not shapes_ok
    ):
        raise DirectionsError(f"{path}: tensors do not match the recorded w_dim {w_dim}")
    ds = DirectionSet(components, scales, values, meta, named)
    if G is not None:
        ds.check_generator(G)
    return ds


def name_direction(path: str | Path, index: int, name: str, layers: str | Sequence[int] | None = "all") -> DirectionSet:
    """Name component ``index`` of a directions file (an admin looked at it: "smile") and keep it with its
    layers (a group name or W+ indices); an existing name is replaced. Returns the updated set."""
    check_direction_name(name)
    ds = load_directions(path)
    d = ds.component(int(index), layers)
    ds.named[name] = NamedDirection(name, d.vector, d.layers, d.method, d.index)
    save_directions(path, ds)
    return ds


# ----------------------------------------------------------------------------------------------------------
# A style's directions file (beside its models, listed in the manifest)


def style_directions_path(style: str, directory: Path | None = None) -> Path:
    """Where a style's directions live: the manifest's ``styles.<style>.directions``, else the default
    ``<models_dir>/<style>.directions.safetensors`` (which may not exist yet)."""
    from gan.styles import read_manifest

    manifest = read_manifest(directory)
    manifest.style(style)  # unknown style: a clear error
    rel = manifest.raw.get("styles", {}).get(style, {}).get("directions")
    return manifest.directory / (rel or f"{style}{DIRECTIONS_SUFFIX}")


def load_style_directions(style: str, directory: Path | None = None, G: Generator | None = None) -> DirectionSet:
    """The style's registered directions (checked against ``G`` when given); a clear error when it has none."""
    from gan.styles import read_manifest

    manifest = read_manifest(directory)
    manifest.style(style)
    rel = manifest.raw.get("styles", {}).get(style, {}).get("directions")
    if not rel:
        raise DirectionsError(
            f"style {style!r} has no directions yet; make them with `toonify directions {style} --register`"
        )
    return load_directions(manifest.directory / rel, G)


def register_directions(directory: Path | None, style: str, path: str | Path) -> Path:
    """List ``path`` as the style's directions in the manifest (``styles.<style>.directions``), atomically;
    the path is stored relative to the manifest's folder when it lies inside it."""
    from gan.styles import set_style_file

    return set_style_file(directory, style, "directions", path)


# ----------------------------------------------------------------------------------------------------------
# Latents: seeds, mixing, interpolation


def seed_latents(G: Generator, seeds: Sequence[int], *, truncation: float = 1.0) -> Tensor:
    """W+ latents [N, num_ws, w_dim] of seeded faces (z drawn as NVIDIA's tools draw them), on G's device."""
    from gan.images import z_from_seeds

    with torch.no_grad():
        w = G.mapping(z_from_seeds(list(seeds), G.z_dim).to(G.device), truncation_psi=truncation)
    return w.unsqueeze(1).repeat(1, G.num_ws, 1)


def _check_pair(ws_a: Tensor, ws_b: Tensor) -> None:
    if ws_a.shape != ws_b.shape or ws_a.ndim not in (2, 3):
        raise ValueError(
            f"expected two W+ latents of one shape, [num_ws, w_dim] or [N, num_ws, w_dim]; "
            f"got {list(ws_a.shape)} and {list(ws_b.shape)}"
        )


def mix_styles(ws_a: Tensor, ws_b: Tensor, layers: Sequence[int]) -> Tensor:
    """Style mixing: a copy of ``ws_a`` with ``ws_b``'s rows at the W+ indices ``layers`` (coarse rows from
    b give b's pose and face shape, fine rows its colours). Shapes [num_ws, w_dim] or [N, num_ws, w_dim]."""
    _check_pair(ws_a, ws_b)
    num_ws = ws_a.shape[-2]
    idx = list(layers)
    bad = [i for i in idx if not 0 <= i < num_ws]
    if bad:
        raise ValueError(f"layer indices must lie in 0…{num_ws - 1}, got {bad}")
    out = ws_a.clone()
    out[..., idx, :] = ws_b[..., idx, :].to(out)
    return out


def interpolate(ws_a: Tensor, ws_b: Tensor, steps: int) -> Tensor:
    """``steps`` latents [steps, num_ws, w_dim] linear in W+ from ``ws_a`` to ``ws_b`` ([num_ws, w_dim] or
    [1, num_ws, w_dim] each); the first and last are the inputs, bit for bit."""
    _check_pair(ws_a, ws_b)
    if ws_a.ndim == 3:
        if ws_a.shape[0] != 1:
            raise ValueError(f"interpolate takes one latent per end, got a batch of {ws_a.shape[0]}")
        ws_a, ws_b = ws_a[0], ws_b[0]
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the two ends), got {steps}")
    t = torch.linspace(0, 1, steps, dtype=ws_a.dtype, device=ws_a.device).view(-1, 1, 1)
    out = torch.lerp(ws_a.unsqueeze(0), ws_b.unsqueeze(0).to(ws_a), t)
    out[0], out[-1] = ws_a, ws_b  # lerp(a, b, 1) may round; the ends are the inputs exactly
    return out


# ----------------------------------------------------------------------------------------------------------
# Frames and animations


def render(G: Generator, ws: Tensor, *, batch: int = 16) -> Tensor:
    """Images [N, 3, R, R] on CPU for W+ latents, with the constant noise (frames stay comparable)."""
    if ws.ndim != 3 or ws.shape[1:] != (G.num_ws, G.w_dim):
        raise ValueError(f"ws must be [N, {G.num_ws}, {G.w_dim}], got {list(ws.shape)}")
    with torch.no_grad():
        return torch.cat(
            [
                G.synthesis(ws[i : i + batch].to(G.device), noise_mode="const").float().cpu()
                for i in range(0, len(ws), batch)
            ]
        )


def _labelled(image: Image.Image, text: str) -> Image.Image:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    band = 14
    out = Image.new("RGB", (image.width, image.height + band), "white")
    out.paste(image, (0, 0))
    ImageDraw.Draw(out).text((3, image.height + 1), text, fill="black", font=font)
    return out


def blend_sweep_frames(
    base: Generator,
    toon: Generator,
    ws: Tensor,
    resolutions: Sequence[int] | None = None,
    structure_from: Literal["toon", "base"] = "toon",
    *,
    label: bool = True,
) -> list[Image.Image]:
    """One frame per swap level: ``ws`` [N, num_ws, w_dim] rendered by ``blend(base, toon, swap at r)`` for r
    from 4 px up to full resolution (or ``resolutions``), the N faces side by side. ``label`` writes the swap
    level under each frame (which also keeps equal frames distinct, so GIF writers never merge them)."""
    from gan.blending import BlendSpec, blend
    from gan.images import make_grid

    if ws.ndim == 2:
        ws = ws.unsqueeze(0)
    if ws.ndim != 3 or ws.shape[1:] != (base.num_ws, base.w_dim):
        raise ValueError(f"ws must be [N, {base.num_ws}, {base.w_dim}], got {list(ws.shape)}")
    levels = list(resolutions) if resolutions is not None else [2**i for i in range(2, base.log_size + 1)]
    if not levels:
        raise ValueError("no swap levels to sweep")
    frames = []
    for res in levels:
        G = blend(base, toon, BlendSpec(mode="swap", resolution=int(res), structure_from=structure_from))
        frame = make_grid(render(G, ws), columns=len(ws), pad=0 if len(ws) == 1 else 2)
        frames.append(_labelled(frame, f"swap {res}px") if label else frame)
        del G
    return frames


def _format_for(path: Path) -> str:
    fmt = {".gif": "gif", ".webp": "webp"}.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"an animation is written as .gif or .webp, not {path.suffix or 'no suffix'!r} ({path})")
    return fmt


def _write_animation(frames: Sequence[Image.Image], target: Any, fmt: str, duration_ms: int) -> None:
    if not frames:
        raise ValueError("no frames to animate")
    if fmt not in ("gif", "webp"):
        raise ValueError(f"animation format must be 'gif' or 'webp', got {fmt!r}")
    first, *rest = [f.convert("RGB") for f in frames]
    extra = {"lossless": True} if fmt == "webp" else {"optimize": False, "disposal": 1}
    first.save(
        target, format=fmt.upper(), save_all=True, append_images=rest, duration=int(duration_ms), loop=0, **extra
    )


def save_animation(frames: Sequence[Image.Image], path: str | Path, duration_ms: int = 120) -> Path:
    """Write frames as a looping animated GIF or WebP, chosen by the suffix (atomic)."""
    path = Path(path)
    fmt = _format_for(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        _write_animation(frames, f, fmt, duration_ms)
    tmp.replace(path)
    return path


def animation_bytes(frames: Sequence[Image.Image], fmt: str = "gif", duration_ms: int = 120) -> bytes:
    """The frames as a looping animated GIF or WebP in memory (for chat uploads)."""
    buf = io.BytesIO()
    _write_animation(frames, buf, fmt.lower(), duration_ms)
    return buf.getvalue()
