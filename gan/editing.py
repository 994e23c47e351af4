"""SeFa: closed-form semantic directions in W from the generator's modulation weights (Shen & Zhou, 2021).

Every modulated layer maps w to per-channel styles with an affine ``A·w + b``; a direction ``d`` moves the
styles by ``A·d``. SeFa stacks the chosen layers' ``A`` (each style unit's weight vector normalised to unit
length, so wide layers do not drown narrow ones), and takes the eigenvectors of ``AᵀA`` with the largest
eigenvalues: the unit directions that move the styles most.

Layers are named by the W+ index they read (``ws[:, i]``), the same indices :func:`apply_direction` edits.
Style conv ``i`` is ``conv1`` for i = 0 and ``convs[i-1]`` after that, so style convs cover indices
0 … num_ws−2; ToRGB layers (``to_rgb1`` reads 1, ``to_rgbs[k]`` reads 2k+3) join only with
``include_torgb=True``. By default all style convs are used, as in SeFa and rosinality's
``closed_form_factorization.py`` (which however skips the normalisation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gan.networks import Generator


def ws_resolution(index: int) -> int:
    """Output resolution of the style conv that reads ``ws[:, index]``."""
    return 4 if index == 0 else 8 * 2 ** ((index - 1) // 2)


def layers_for_resolutions(G: Generator, low: int = 4, high: int | None = None) -> list[int]:
    """W+ indices of the style convs whose output resolution lies in [low, high] (e.g. 4…16 = coarse)."""
    high = G.resolution if high is None else high
    return [i for i in range(G.num_ws - 1) if low <= ws_resolution(i) <= high]


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
