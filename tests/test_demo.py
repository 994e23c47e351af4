import torch

from gan import load_generator
from gan.cli import main as cli_main


def test_demo_writes_models_and_grid(tmp_path):
    assert cli_main(["demo", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "demo.png").stat().st_size > 0
    base = load_generator(tmp_path / "base.safetensors")
    toon = load_generator(tmp_path / "toon.pt")
    blended = load_generator(tmp_path / "blend16.safetensors")
    assert blended.meta["blend"]["resolution"] == 16
    assert blended.meta["parents"] == {"base": base.meta["content_hash"], "toon": toon.meta["content_hash"]}
    # the toon records its base, so lineage is intact; its images differ from the base's
    assert base.meta["content_hash"] in toon.meta["ancestors"]
    ws = base.w_avg.expand(1, base.num_ws, -1)
    with torch.no_grad():
        assert not torch.allclose(base.synthesis(ws), toon.synthesis(ws))


def test_cli_blend_writes_a_reproducible_recipe(tmp_path):
    assert cli_main(["demo", "--out", str(tmp_path)]) == 0
    out = tmp_path / "smooth.safetensors"
    args = ["blend", str(tmp_path / "base.safetensors"), str(tmp_path / "toon.pt"), "--swap", "16"]
    assert cli_main([*args, "--width", "0.7", "--out", str(out)]) == 0
    G = load_generator(out)
    assert G.meta["blend"] == {"mode": "smooth", "resolution": 16, "width": 0.7, "structure_from": "toon", "level": 0}
    assert cli_main([*args, "--weights", "1,1,0.5", "--out", str(tmp_path / "bad.safetensors")]) == 2
