"""How long ``toonify styles add`` takes from two downloaded files to a listed style, at real model sizes.

    python bench/styles_add.py                       # config-f at 256 and 1024 px, random weights, CPU
    python bench/styles_add.py --resolutions 256 --json out.json
    python bench/styles_add.py --quick               # a 32 px toy: the same code path, fast

For each resolution it writes a config-f base as an NVIDIA stylegan2-ada-pytorch pickle and a fine-tune-like
toon (the base's weights moved 5 %) as a rosinality .pt, as an operator downloads them, then times
``gan.model_admin.add_style`` into an empty folder: once with the preview sheet (4 seeds) and once without.
The time covers reading both files (the pickle through the allow-listing unpickler), the pair check,
writing both as .safetensors, the preview and the manifest. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gan.checkpoints import save_generator  # noqa: E402
from gan.model_admin import add_style  # noqa: E402
from gan.networks import Generator, GeneratorConfig  # noqa: E402
from tests.nv_pickles import write_nv_pytorch_pickle  # noqa: E402
from tests.test_styles_admin import SMALL, fine_tune_of  # noqa: E402


def downloads(folder: Path, config: GeneratorConfig) -> tuple[Path, Path]:
    torch.manual_seed(0)
    base = Generator(config)
    base.compute_w_avg(n=1024)
    write_nv_pytorch_pickle(folder / "base.pkl", base)
    save_generator(fine_tune_of(base, 1), folder / "toon.pt")
    return folder / "base.pkl", folder / "toon.pt"


def time_add(folder: Path, base: Path, toon: Path, preview: bool) -> dict:
    models = folder / f"models-{'preview' if preview else 'plain'}"
    t0 = time.perf_counter()
    added = add_style(models, "bench", base, toon, preview_seeds=(0, 1, 2, 3) if preview else None)
    seconds = time.perf_counter() - t0
    return {"preview": preview, "seconds": seconds, "shares_base": added.check.shares_base,
            "median_relative": added.check.median_relative}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", default="256,1024")
    p.add_argument("--quick", action="store_true", help="a 32 px toy instead of config-f")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    configs = [SMALL] if args.quick else [GeneratorConfig(resolution=int(r)) for r in args.resolutions.split(",")]
    rows = []
    print(f"{'model':<10} {'res':>5} {'pkl MB':>7} {'pt MB':>7} {'preview':>8} {'seconds':>8} {'pair':>14}")
    for config in configs:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            base, toon = downloads(folder, config)
            sizes = base.stat().st_size / 1e6, toon.stat().st_size / 1e6
            for preview in (True, False):
                row = {"model": "toy" if args.quick else "config-f", "resolution": config.resolution,
                       "pkl_mb": sizes[0], "pt_mb": sizes[1], **time_add(folder, base, toon, preview)}  # fmt: skip
                rows.append(row)
                pair = f"{'shared' if row['shares_base'] else 'unrelated'} {row['median_relative']:.3f}"
                print(f"{row['model']:<10} {row['resolution']:>5} {sizes[0]:>7.0f} {sizes[1]:>7.0f} "
                      f"{'yes' if preview else 'no':>8} {row['seconds']:>8.1f} {pair:>14}", flush=True)  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"threads {torch.get_num_threads()}, peak RSS {peak:.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "threads": torch.get_num_threads(),
                                               "peak_rss_gib": peak}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
