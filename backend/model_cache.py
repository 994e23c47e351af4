"""Loaded models kept on the worker's device, least recently used evicted first, within a memory budget.

A toon job needs the base generator (with its encoder and perceptual loss) and one toon generator per style;
blends are derived from the two and cached inside each :class:`~gan.pipeline.Toonifier`. An instant toon job
needs the style's student network for its blend (:meth:`ModelCache.student`). Loading a checkpoint costs
seconds, so everything stays loaded until the budget says otherwise.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from backend import metrics
from gan.align import FaceAligner
from gan.checkpoints import CheckpointError, load_discriminator, load_generator
from gan.encoder import load_encoder
from gan.networks import Generator
from gan.perceptual import build_perceptual_loss
from gan.pipeline import Toonifier

if TYPE_CHECKING:
    from gan.distill import Student, StudentLineage


def module_bytes(*modules: torch.nn.Module | None) -> int:
    return sum(t.numel() * t.element_size() for m in modules if m is not None for t in m.state_dict().values())


@dataclass(frozen=True)
class BaseModels:
    """Where the base generator, its encoder and the optional LPIPS weights live."""

    base: Path
    encoder: Path | None = None
    vgg: Path | None = None
    lpips: Path | None = None


def base_models_from_manifest(models_dir: Path, toon: Path | None = None, style: str | None = None) -> BaseModels:
    """The base generator and encoder for ``toon`` per the model manifest in ``models_dir``: the base of the
    manifest's style with that toon checkpoint (each style may have its own; ``style`` picks between styles
    sharing the file), else the folder's base (community fine-tunes start from it)."""
    from gan.styles import serving_manifest

    base, encoder = serving_manifest(models_dir).models_for(toon, style)
    if base is None:
        raise ValueError(f"the model manifest in {models_dir} names no base checkpoint")
    return BaseModels(base=base, encoder=encoder)


def _stamps(*paths: Path | None) -> tuple:
    """(path, mtime, size) per file: what identifies a file's current contents without reading them."""
    out = []
    for path in paths:
        try:
            st = Path(path).stat() if path is not None else None
        except OSError:
            st = None  # missing: the load that follows says so
        out.append((str(path), st.st_mtime_ns if st else None, st.st_size if st else None))
    return tuple(out)


class ModelCache:
    """``toonifier(base_models, toon_path)`` → a ready Toonifier, sharing the base between styles."""

    def __init__(self, device: str | torch.device, budget_bytes: int = 4 << 30, min_face_size: int = 64) -> None:
        self.device = torch.device(device)
        self.budget_bytes = budget_bytes
        self.min_face_size = min_face_size
        self._lock = threading.Lock()  # jobs load from worker threads
        self._entries: OrderedDict[tuple, tuple[object, int]] = OrderedDict()
        self.loads = 0  # checkpoint loads so far (a cache hit loads nothing)

    @property
    def used_bytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def _get(self, key: tuple, load) -> object:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                metrics.MODEL_CACHE.labels(result="hit").inc()
                return self._entries[key][0]
        metrics.MODEL_CACHE.labels(result="miss").inc()
        value, size = load()
        with self._lock:
            self.loads += 1
            self._entries[key] = (value, size)
            self._entries.move_to_end(key)
            while len(self._entries) > 1 and self.used_bytes > self.budget_bytes:
                old, _ = self._entries.popitem(last=False)
                if old[0] == "base":  # its Toonifiers hold it: drop them too, or nothing is freed
                    for k in [k for k in self._entries if k[0] == "toonifier" and k[1] == old[1]]:
                        del self._entries[k]
        return value

    def base(self, models: BaseModels) -> tuple[Generator, torch.nn.Module | None, torch.nn.Module]:
        """(base generator, encoder or None, perceptual loss) for ``models``."""

        def load():
            G = load_generator(models.base, self.device).eval().requires_grad_(False)
            try:
                D = load_discriminator(models.base, self.device)
            except CheckpointError:
                D = None
            enc = load_encoder(models.encoder, G, device=self.device) if models.encoder else None
            loss = build_perceptual_loss(models.vgg, models.lpips, discriminator=D).to(self.device)
            return (G, enc, loss), module_bytes(G, D, enc)

        return self._get(("base", models, *_stamps(models.base, models.encoder)), load)

    def toonifier(self, models: BaseModels, toon_path: Path) -> Toonifier:
        def load():
            G, enc, loss = self.base(models)
            toon = load_generator(toon_path, self.device)
            aligner = FaceAligner(min_face_size=self.min_face_size)
            tf = Toonifier(G, toon, encoder=enc, loss_fn=loss, aligner=aligner, device=self.device, cache_size=2)
            return tf, module_bytes(toon) * (1 + 2)  # the toon generator and up to two cached blends

        # File stamps in the key: a checkpoint replaced under the same name (`toonify styles add --replace`) is
        # loaded afresh by a running worker instead of served from memory.
        return self._get(("toonifier", models, *_stamps(models.base, models.encoder, toon_path)), load)

    def student(self, path: Path, lineage: StudentLineage, device: str | torch.device | None = None) -> Student:
        """The student network at ``path``, checked against ``lineage`` (the style's base and toon generators
        and the blend): a student made for anything else raises StudentMismatchError and is not kept. A file
        rewritten in place (a newer distillation of the same blend) is loaded again."""
        from gan.distill import load_student

        device = torch.device(device) if device is not None else self.device
        path = Path(path)
        version = path.stat().st_mtime_ns  # FileNotFoundError for a file that is gone

        def load():
            st = load_student(path, lineage=lineage, device=device)
            return st, module_bytes(st)

        made_for = (lineage.base_hash, lineage.toon_hash, lineage.spec.key())
        return self._get(("student", str(path), version, made_for, str(device)), load)
