"""The worker's model cache: loaded models are reused, and the least recently used go when over budget."""

from __future__ import annotations

from backend.model_cache import ModelCache, base_models_from_manifest, module_bytes
from gan.styles import DEMO_DIR, get_style


def test_cache_reuses_models_and_evicts_the_least_recently_used_over_budget():
    base = base_models_from_manifest(DEMO_DIR)
    toon, other = get_style(None, DEMO_DIR).toon, base.base  # two "styles": the toon and the base itself
    roomy = ModelCache("cpu")
    a = roomy.toonifier(base, toon)
    assert roomy.toonifier(base, toon) is a and roomy.loads == 2  # base bundle + toonifier, then a hit
    roomy.toonifier(base, other)
    assert roomy.loads == 3 and roomy.used_bytes > module_bytes(a.base)

    budget = roomy.used_bytes - 1  # one entry too many
    tight = ModelCache("cpu", budget_bytes=budget)
    tight.toonifier(base, toon)
    tight.toonifier(base, other)
    assert tight.used_bytes <= budget
    loads = tight.loads
    tight.toonifier(base, toon)  # was evicted: loaded again
    assert tight.loads > loads
