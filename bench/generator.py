"""Generator throughput: images/s for forward and forward+backward synthesis.

    python bench/generator.py                                  # CPU, fp32, 256 and 1024, batch 1 and 8
    python bench/generator.py --device cuda --dtypes fp32,fp16,bf16 --channels-last both

Weights are random config-f (channel multiplier 2) networks: speed does not depend on the values.
Prints one table row per configuration; nothing here asserts anything.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gan.networks import Generator, GeneratorConfig, default_channels

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn, device: str, min_repeats: int, min_seconds: float) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return sorted(times)[len(times) // 2]


def bench_one(G: Generator, batch: int, mode: str, dtype: torch.dtype, channels_last: bool, device: str, args) -> float:
    ws = torch.randn(batch, G.num_ws, G.w_dim, device=device)

    def forward() -> torch.Tensor:
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            return G.synthesis(ws if dtype == torch.float32 else ws.to(dtype))

    if mode == "fwd":

        def step() -> None:
            with torch.no_grad():
                forward()

    else:
        ws.requires_grad_(True)

        def step() -> None:
            forward().float().square().mean().backward()

    set_layout(G, channels_last)
    return batch / measure(step, device, args.repeats, args.min_seconds)


def set_layout(G: Generator, channels_last: bool) -> None:
    G.input.channels_last = channels_last


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolutions", default="256,1024")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--dtypes", default="fp32")
    p.add_argument("--channel-multiplier", type=int, default=2)
    p.add_argument("--channels-last", choices=["on", "off", "both"], default="on")
    p.add_argument("--repeats", type=int, default=2, help="minimum timed calls per row")
    p.add_argument("--min-seconds", type=float, default=1.0, help="minimum timed seconds per row")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layouts = {"on": [True], "off": [False], "both": [True, False]}[args.channels_last]
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"# torch {torch.__version__}, {dev}")
    print(f"{'res':>5} {'batch':>5} {'mode':>7} {'dtype':>5} {'layout':>6} {'img/s':>9} {'ms/img':>9}")
    for res in (int(r) for r in args.resolutions.split(",")):
        cfg = GeneratorConfig(resolution=res, channels=default_channels(res, args.channel_multiplier))
        G = Generator(cfg).to(args.device).eval()
        for batch in (int(b) for b in args.batches.split(",")):
            for mode in args.modes.split(","):
                for name in args.dtypes.split(","):
                    for cl in layouts:
                        ips = bench_one(G, batch, mode, DTYPES[name], cl, args.device, args)
                        layout = "NHWC" if cl else "NCHW"
                        print(f"{res:>5} {batch:>5} {mode:>7} {name:>5} {layout:>6} {ips:>9.3f} {1000 / ips:>9.1f}")
                        sys.stdout.flush()


if __name__ == "__main__":
    main()
