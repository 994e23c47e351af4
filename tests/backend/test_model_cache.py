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


def test_a_checkpoint_replaced_under_the_same_name_is_loaded_afresh(tmp_path):
    import shutil

    import torch

    from gan.checkpoints import load_generator, save_generator

    models = tmp_path / "models"
    shutil.copytree(DEMO_DIR, models)
    base, toon = base_models_from_manifest(models), models / "toon.safetensors"
    cache = ModelCache("cpu")
    before = cache.toonifier(base, toon)
    assert cache.toonifier(base, toon) is before
    changed = load_generator(toon)
    with torch.no_grad():
        changed.to_rgb1.bias.add_(0.5)  # other weights under the same file name (`styles add --replace`)
    save_generator(changed, toon)
    after = cache.toonifier(base, toon)
    assert after is not before and torch.equal(after.toon.to_rgb1.bias, changed.to_rgb1.bias)
