"""``toonify demo``: the GAN core end to end on small seeded models, with no downloads.

It stands in for real checkpoints: a randomly initialised "base" and a "toon" derived from it (so their
lineage shows a common base, as a real fine-tune's would). Real models: see README, "Checkpoints".
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gan.blending import BlendSpec, blend
from gan.checkpoints import content_hash, load_generator, read_checkpoint, save_generator, write_checkpoint
from gan.images import save_grid, z_from_seeds
from gan.networks import Generator, GeneratorConfig

DEMO_CONFIG = GeneratorConfig(
    resolution=64, w_dim=64, z_dim=64, n_mlp=4, channels={4: 64, 8: 64, 16: 64, 32: 32, 64: 32}
)


def make_demo_pair(seed: int = 0) -> tuple[Generator, Generator]:
    torch.manual_seed(seed)
    base = Generator(DEMO_CONFIG).eval()
    base.compute_w_avg(2000)
    base.meta = {"name": "demo-base", "ancestors": []}
    toon = Generator(DEMO_CONFIG).eval()
    toon.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a stand-in for fine-tuning: perturb the low-resolution synthesis layers
        for name, p in toon.named_parameters():
            if name.startswith(("input.", "conv1.", "convs.0.", "convs.1.", "convs.2.", "convs.3.")):
                p.add_(torch.randn(p.shape, generator=g) * 0.5 * p.abs().mean().clamp_min(1e-3))
    toon.w_avg.copy_(base.w_avg)
    toon.meta = {"name": "demo-toon", "ancestors": [content_hash(base.state_dict())]}
    return base, toon


def run_demo(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    base, toon = make_demo_pair()
    base_path = save_generator(base, out / "base.safetensors")
    toon_path = save_generator(toon, out / "toon.safetensors")
    pt_path = write_checkpoint(read_checkpoint(toon_path), out / "toon.pt")  # rosinality format round trip
    base, toon = load_generator(base_path), load_generator(pt_path)
    z = z_from_seeds(list(range(8)), base.z_dim)
    rows = []
    with torch.no_grad():
        ws = base.mapping(z, truncation_psi=0.7).unsqueeze(1).expand(-1, base.num_ws, -1)
        rows += [base.synthesis(ws), toon.synthesis(ws)]
        for swap in (8, 16, 32):
            blended = blend(base, toon, BlendSpec(mode="swap", resolution=swap, structure_from="toon"))
            save_generator(blended, out / f"blend{swap}.safetensors")
            rows.append(blended.synthesis(ws))
    grid = save_grid(torch.cat(rows), out / "demo.png", columns=8)
    print(f"wrote {grid}: rows = base, toon, blends at 8/16/32; checkpoints in {out}", file=sys.stderr)
