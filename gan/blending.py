"""Placeholder: BlendSpec and blend() are being written (see tests/test_blending.py)."""

from __future__ import annotations


class BlendSpec:  # pragma: no cover - replaced by the real implementation
    pass


def blend(base, toon, spec):  # pragma: no cover
    raise NotImplementedError
