"""Layer swapping and resolution-dependent interpolation of two generators (Toonify's "blended model").

Semantics follow Justin Pinkney's ``blend_models.py`` (justinpinkney/stylegan2), written anew for our
rosinality-named :class:`~gan.networks.Generator`:

* **Positions.** Layers are grouped per resolution into level 0 (``input.input`` at 4x4 = TF ``Const``;
  ``convs.{2k}`` = ``Conv0_up`` of resolution 8·2^k) and level 1 (``to_rgb1`` at 4x4; ``convs.{2k+1}`` and
  ``to_rgbs.{k}``). One position per (resolution, level): 4x4 → 0, 1; 8x8 → 2, 3; …; a model of resolution R
  has ``2·log2(R) − 2`` positions.
* **Rule.** ``mid`` = position of (``spec.resolution``, ``spec.level``), ``x = pos − mid``. Hard swap:
  ``y = 1 if x > 1 else 0``, so a swap at R (level 0) still takes R from the low-res model and 2R upwards
  from the high-res model. Smooth: ``y = 1/(1 + exp(−x/width))``, 0.5 at ``mid``. Each parameter is
  ``y·high + (1−y)·low``. Weights of exactly 0 or 1 copy tensors bit for bit; mixes are computed in float32.
* **Never blended** (Justin's clone of the low-res model keeps them): the mapping network ``style.*``, the
  average latent ``w_avg``, every buffer (``noises.*``, the fixed FIR kernels) and, a quirk of his name
  patterns, the 4x4 ``conv1``. We keep the quirk so a recipe reproduces the published Toonify blends (the
  t27 PyTorch port blends ``b4.conv1`` with level 1 instead). These come from the *structure* model.
* **Direction.** ``structure_from="toon"`` (Toonify: low-res layers, i.e. shape and pose, from the toon
  model; high-res texture from the base) or ``"base"`` (the reverse).

Additions to Justin's script: swaps at 4x4 (``y`` = 1 from 8x8 up); ``mode="weights"``, an explicit vector with
one weight per position giving the *toon model's share* (``structure_from`` then only picks the source of
the never-blended parts); architecture checks (:class:`BlendError`); a lineage check
(:class:`LineageWarning`); and ``meta`` on the result recording the recipe and both parents' content hashes.

Blends of more than two generators (:func:`blend_many`): one share per model and blend position, each
position's shares summing to 1 (e.g. the base, a mid-training snapshot and the final toon model). The
never-blended parts come from one chosen model, by default the one with the largest share at 4x4, which is
what Toonify does with two (the mapping follows the shape).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # BlendSpec is used by torch-free processes (the bots): import torch only to blend
    from gan.networks import Generator

Mode = Literal["swap", "smooth", "weights"]
Source = Literal["toon", "base"]
MIN_SWAP_RES, MAX_SWAP_RES = 4, 1024


class BlendError(ValueError):
    """The two generators cannot be blended (different architectures)."""


class LineageWarning(UserWarning):
    """The two generators' recorded lineage shows no common base model."""


def num_positions(resolution: int) -> int:
    """Blend positions of a model of this resolution: two per resolution from 4x4 up."""
    log = int(math.log2(resolution)) if resolution > 0 else 0
    if resolution < 8 or 2**log != resolution:
        raise ValueError(f"model resolution must be a power of two >= 8, got {resolution}")
    return 2 * log - 2


def blend_position(name: str) -> int | None:
    """Position of a parameter name, or None for the never-blended parts (``style.*``, ``conv1.*``)."""
    head, _, rest = name.partition(".")
    if head == "input":
        return 0
    if head == "to_rgb1":
        return 1
    if head == "convs":  # convs.{i}: i = 2k (level 0) or 2k+1 (level 1) of resolution 8·2^k
        return int(rest.split(".")[0]) + 2
    if head == "to_rgbs":
        return 2 * int(rest.split(".")[0]) + 3
    return None


def _logistic(z: float) -> float:
    # Stable on both sides: a tiny width must give 0/1, not an OverflowError.
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@dataclass(frozen=True)
class BlendSpec:
    """A reproducible blend recipe. ``resolution``/``level`` (and ``width`` for smooth) for swap/smooth;
    ``weights`` (toon share per position, each in [0, 1]) for ``mode="weights"``."""

    mode: Mode = "swap"
    resolution: int | None = None
    structure_from: Source = "toon"
    width: float | None = None
    level: int = 0
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("swap", "smooth", "weights"):
            raise ValueError(f"mode must be 'swap', 'smooth' or 'weights', got {self.mode!r}")
        if self.structure_from not in ("toon", "base"):
            raise ValueError(f"structure_from must be 'toon' or 'base', got {self.structure_from!r}")
        if self.mode == "weights":
            if self.weights is None:
                raise ValueError("mode='weights' needs weights: one toon share per blend position")
            if self.resolution is not None or self.width is not None or self.level != 0:
                raise ValueError("mode='weights' takes no resolution, width or level")
            w = tuple(float(v) for v in self.weights)
            if len(w) < 4 or len(w) % 2:
                raise ValueError(f"weights needs 2·log2(R) - 2 values (4 for 8px … 18 for 1024px), got {len(w)}")
            bad = [v for v in w if not 0.0 <= v <= 1.0]  # NaN fails too
            if bad:
                raise ValueError(f"weights must lie in [0, 1] (share of the toon model), got {bad}")
            object.__setattr__(self, "weights", w)
            return
        if self.weights is not None:
            raise ValueError(f"weights only apply to mode='weights', not {self.mode!r}")
        r = self.resolution
        if not isinstance(r, int) or isinstance(r, bool) or r not in [2**i for i in range(2, 11)]:
            raise ValueError(f"resolution must be a power of two in {MIN_SWAP_RES}…{MAX_SWAP_RES}, got {r!r}")
        if self.level not in (0, 1):
            raise ValueError(f"level must be 0 (Conv0_up/Const) or 1 (Conv1/ToRGB), got {self.level!r}")
        if self.mode == "smooth":
            if not isinstance(self.width, int | float) or not math.isfinite(self.width) or self.width <= 0:
                raise ValueError(f"mode='smooth' needs a finite width > 0, got {self.width!r}")
            object.__setattr__(self, "width", float(self.width))
        elif self.width is not None:
            raise ValueError("width only applies to mode='smooth'")

    def layer_weights(self, resolution: int) -> list[float]:
        """Share of the toon model at each blend position of a model of ``resolution``."""
        n = num_positions(resolution)
        if self.weights is not None:
            if len(self.weights) != n:
                raise ValueError(f"a {resolution}px model has {n} blend positions, but {len(self.weights)} weights")
            return list(self.weights)
        assert self.resolution is not None
        if self.resolution > resolution:
            raise ValueError(f"cannot blend at {self.resolution}px: the models are only {resolution}px")
        mid = 2 * (int(math.log2(self.resolution)) - 2) + self.level
        if self.mode == "smooth":
            high = [_logistic((pos - mid) / self.width) for pos in range(n)]  # type: ignore[operator]
        else:
            high = [1.0 if pos - mid > 1 else 0.0 for pos in range(n)]
        # y is the high-res model's share; the toon model is the high-res one when structure comes from base.
        return high if self.structure_from == "base" else [1.0 - y for y in high]

    def key(self) -> str:
        """A canonical string for the blend: two specs that render the same have the same key."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    def to_json(self) -> dict:
        d: dict = {"mode": self.mode, "structure_from": self.structure_from}
        if self.weights is not None:
            d["weights"] = list(self.weights)
        else:
            d.update(resolution=self.resolution, level=self.level)
            if self.width is not None:
                d["width"] = self.width
        return d

    @classmethod
    def from_json(cls, d: dict | str) -> BlendSpec:
        d = json.loads(d) if isinstance(d, str) else dict(d)
        unknown = set(d) - {"mode", "structure_from", "resolution", "level", "width", "weights"}
        if unknown:
            raise ValueError(f"unknown BlendSpec fields: {sorted(unknown)}")
        return cls(**d)

    def describe(self) -> str:
        shape, other = self.structure_from, "base" if self.structure_from == "toon" else "toon"
        if self.mode == "weights":
            shares = " ".join(f"{w:g}" for w in self.weights or ())
            return f"custom blend, toon share per layer: {shares}; mapping and 4x4 conv from {shape}"
        where = f"{self.resolution}px" + (" (level 1)" if self.level else "")
        if self.mode == "smooth":
            return f"smooth blend around {where}, width {self.width:g}: shape from {shape}, texture from {other}"
        return f"swap at {where}: shape from {shape} up to {self.resolution}px, texture from {other} above"


def _lineage(G: Generator) -> tuple[str, set[str]]:
    from gan.checkpoints.common import content_hash

    meta = getattr(G, "meta", None) or {}
    return meta.get("content_hash") or content_hash(G.state_dict()), set(meta.get("ancestors") or ())


def _related(a: tuple[str, set[str]], b: tuple[str, set[str]]) -> bool:
    """One model descends from the other, or both from a common ancestor (per their recorded lineage)."""
    (ha, anc_a), (hb, anc_b) = a, b
    return ha == hb or ha in anc_b or hb in anc_a or bool(anc_a & anc_b)


def check_compatible(base: Generator, toon: Generator) -> None:
    if base.config != toon.config:
        raise BlendError(f"cannot blend different architectures: base {base.config} vs toon {toon.config}")
    sb, st = base.state_dict(), toon.state_dict()
    bad = sorted(k for k in sb.keys() | st.keys() if k not in sb or k not in st or sb[k].shape != st[k].shape)
    if bad:
        raise BlendError(f"cannot blend: base and toon state dicts differ in {len(bad)} entries, e.g. {bad[:5]}")


def blend(base: Generator, toon: Generator, spec: BlendSpec) -> Generator:
    """A new generator mixing ``base`` and ``toon`` per ``spec``, on base's device and dtype, in eval mode.

    Raises :class:`BlendError` for different architectures; warns :class:`LineageWarning` when ``G.meta``
    shows no common base. ``result.meta`` holds the recipe, both parents' hashes and the union of ancestors.
    """
    check_compatible(base, toon)
    shares = spec.layer_weights(base.resolution)
    (hb, anc_b), (ht, anc_t) = _lineage(base), _lineage(toon)
    if not _related((hb, anc_b), (ht, anc_t)):
        warnings.warn(
            f"base ({hb[:12]}) and toon ({ht[:12]}) share no recorded ancestor; blending models that were not "
            "fine-tuned from one another usually gives garbage",
            LineageWarning,
            stacklevel=2,
        )
    structure = toon if spec.structure_from == "toon" else base
    device = base.device
    params = {name for name, _ in base.named_parameters()}
    sb, st, ss = base.state_dict(), toon.state_dict(), structure.state_dict()
    out_sd = {}  # state_dict() tensors are detached: no autograd bookkeeping to switch off
    for name, tb in sb.items():
        pos = blend_position(name) if name in params else None
        if pos is None:
            out_sd[name] = ss[name]
        elif shares[pos] == 0.0:
            out_sd[name] = tb
        elif shares[pos] == 1.0:
            out_sd[name] = st[name]
        else:
            t = shares[pos]
            out_sd[name] = (st[name].to(device).float() * t + tb.float() * (1.0 - t)).to(tb.dtype)
    out = copy.deepcopy(base)  # keeps base's device, dtype and runtime settings
    out.load_state_dict(out_sd, strict=True)  # copies across devices/dtypes into out's tensors
    out.w_avg.copy_(structure.w_avg)
    out.meta = {
        "blend": spec.to_json(),
        "parents": {"base": hb, "toon": ht},
        "ancestors": sorted({hb, ht} | anc_b | anc_t),
    }
    return out.eval()


SHARE_TOLERANCE = 1e-6  # how far a position's shares may sum from 1 (text such as 0.3,0.3,0.4 is not exact)


def base_and_toon_shares(toon_shares: Sequence[Sequence[float]]) -> list[list[float]]:
    """Rows for :func:`blend_many` from the toons' rows alone: the base (row 0) takes at each position what the
    toons leave. Each toon share must lie in [0, 1] and the toons' shares at a position may not exceed 1."""
    rows = [[float(v) for v in row] for row in toon_shares]
    if not rows or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError("give one row of shares per toon model, all of the same length (one per blend position)")
    bad = [v for r in rows for v in r if not 0.0 <= v <= 1.0]  # NaN fails too
    if bad:
        raise ValueError(f"shares must lie in [0, 1], got {bad[:5]}")
    left = [1.0 - math.fsum(col) for col in zip(*rows, strict=True)]
    over = [i for i, v in enumerate(left) if v < -SHARE_TOLERANCE]
    if over:
        raise ValueError(f"the toons' shares add up to more than 1 at blend positions {over}")
    return [[max(0.0, v) for v in left], *rows]


def blend_many(
    generators: Sequence[Generator], shares: Sequence[Sequence[float]], *, structure_from: int | None = None
) -> Generator:
    """A generator mixing several models layer by layer, on the first model's device and dtype, in eval mode.

    ``shares[i][p]`` is model ``i``'s share at blend position ``p`` (4x4 const first, as ``BlendSpec.weights``;
    ``2·log2(R) − 2`` positions); at every position the shares lie in [0, 1] and sum to 1. A share of exactly 1
    copies that model's tensors bit for bit; mixes are computed in float32. ``structure_from`` is the index of
    the model that gives the never-blended parts (mapping, 4x4 ``conv1``, buffers, ``w_avg``); by default the
    one with the largest share at position 0. With two models and ``shares = [1 - w, w]`` this is
    :func:`blend` with ``BlendSpec(mode="weights", weights=w)``.

    Raises :class:`BlendError` for different architectures and ``ValueError`` for bad shares; warns
    :class:`LineageWarning` for each pair of models whose lineage shows no common base. ``result.meta``:
    ``blend_many`` (shares, structure_from, parents: the models' content hashes in order) and the union of
    ancestors.
    """
    models = list(generators)
    if len(models) < 2:
        raise ValueError(f"a blend needs at least two generators, got {len(models)}")
    if len(shares) != len(models):
        raise ValueError(f"{len(models)} generators but {len(shares)} rows of shares (one row per generator)")
    for G in models[1:]:
        check_compatible(models[0], G)
    n = num_positions(models[0].resolution)
    rows = [[float(v) for v in row] for row in shares]
    for i, row in enumerate(rows):
        if len(row) != n:
            raise ValueError(f"a {models[0].resolution}px model has {n} blend positions, but row {i} has {len(row)}")
        bad = [v for v in row if not 0.0 <= v <= 1.0]
        if bad:
            raise ValueError(f"shares must lie in [0, 1]; row {i} has {bad[:5]}")
    sums = [math.fsum(col) for col in zip(*rows, strict=True)]
    off = [(p, round(v, 6)) for p, v in enumerate(sums) if abs(v - 1.0) > SHARE_TOLERANCE]
    if off:
        raise ValueError(f"the shares at each blend position must sum to 1; (position, sum): {off}")
    if structure_from is None:
        structure_from = max(range(len(models)), key=lambda i: (rows[i][0], -i))  # ties: the first
    if not 0 <= structure_from < len(models):
        raise ValueError(f"structure_from must be a model index in 0…{len(models) - 1}, got {structure_from}")

    lineage = [_lineage(G) for G in models]
    for a, b in itertools.combinations(range(len(models)), 2):
        if not _related(lineage[a], lineage[b]):
            warnings.warn(
                f"models {a} ({lineage[a][0][:12]}) and {b} ({lineage[b][0][:12]}) share no recorded ancestor; "
                "blending models that were not fine-tuned from one another usually gives garbage",
                LineageWarning,
                stacklevel=2,
            )

    first, structure = models[0], models[structure_from]
    device = first.device
    params = {name for name, _ in first.named_parameters()}
    states = [G.state_dict() for G in models]
    ss = states[structure_from]
    out_sd = {}
    for name, t0 in states[0].items():
        pos = blend_position(name) if name in params else None
        if pos is None:
            out_sd[name] = ss[name]
            continue
        column = [row[pos] for row in rows]
        whole = [i for i, w in enumerate(column) if w == 1.0]
        if whole:
            out_sd[name] = states[whole[0]][name]
            continue
        terms = [sd[name].to(device).float() * w for sd, w in zip(states, column, strict=True) if w > 0.0]
        out_sd[name] = sum(terms[1:], terms[0]).to(t0.dtype)
    out = copy.deepcopy(first)
    out.load_state_dict(out_sd, strict=True)
    out.w_avg.copy_(structure.w_avg)
    hashes = [h for h, _ in lineage]
    out.meta = {
        "blend_many": {"shares": rows, "structure_from": structure_from, "parents": hashes},
        "ancestors": sorted(set(hashes).union(*(anc for _, anc in lineage))),
    }
    return out.eval()
