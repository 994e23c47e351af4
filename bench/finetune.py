"""Fine-tuning speed (kimg/s) and, with --compare, the quality of fine-tune recipes at equal kimg (KID).

    python bench/finetune.py                                   # CPU, 64 and 256 px, batch 8, fp32
    python bench/finetune.py --resolutions demo                # the demo base model's own networks
    python bench/finetune.py --device cuda --amp off,on        # GPU, fp32 and bfloat16 autocast
    python bench/finetune.py --compare                         # KID per recipe (FreezeD/ADA vs plain)
    python bench/finetune.py --compare --kimg 0.5 --images 64  # a tiny CPU-sized comparison

Speed: config-f networks (channel multiplier 2) with random weights (speed does not depend on the values),
the fine-tune recipe of ``gan.finetune`` (FreezeD 2, DiffAugment colour/translation/cutout at p = 1, lazy R1
every 16 steps). A step without R1 is timed ``--steps`` times (median), the R1 step once; kimg/s amortises R1
over its interval. Compare: the demo base model fine-tuned on ``--images`` synthetic toons by each recipe for
the same kimg; KID on the base discriminator's features against the training images and against
``--heldout`` fresh toons (synthetic data makes the held-out set free: it tells generalisation from
memorisation). Prints tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

# The repository instead of bench/ on the path: bench/queue.py would shadow the standard library's queue,
# which torch imports.
ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gan.checkpoints import load_discriminator, load_generator  # noqa: E402
from gan.finetune import DiscriminatorFeatures, FinetuneSettings, kid, render  # noqa: E402
from gan.images import from_uint8  # noqa: E402
from gan.networks import Discriminator, Generator, GeneratorConfig, default_channels  # noqa: E402
from gan.synthetic import make_dataset  # noqa: E402
from gan.training import Trainer  # noqa: E402

DEMO_BASE = ROOT / "gan" / "demo_models" / "base.safetensors"
RECIPES = {  # name -> FinetuneSettings overrides
    "plain": {"freeze_d": 0, "aug": "none"},
    "diffaug": {"freeze_d": 0, "aug": "diffaug"},
    "ada": {"freeze_d": 0, "aug": "ada"},
    "freezed": {"freeze_d": 2, "aug": "none"},
    "freezed+ada": {"freeze_d": 2, "aug": "ada"},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_step(trainer: Trainer) -> float:
    sync(trainer.device)
    t0 = time.perf_counter()
    trainer.step()
    sync(trainer.device)
    return time.perf_counter() - t0


def networks(resolution: int | str, device: torch.device, args) -> tuple[Generator, Discriminator, str]:
    """Random config-f networks at ``resolution``, or the demo base model's own (``"demo"``)."""
    if resolution == "demo":
        G, D = load_generator(DEMO_BASE, device), load_discriminator(DEMO_BASE, device)
        return G, D, "demo base (64 px, 16-64 channels)"
    torch.manual_seed(0)
    channels = default_channels(int(resolution), args.channel_multiplier)
    G = Generator(GeneratorConfig(resolution=int(resolution), channels=channels)).to(device)
    D = Discriminator(resolution=int(resolution), channels=channels).to(device)
    return G, D, f"config-f x{args.channel_multiplier}, random weights"


def speed(resolution: int | str, batch: int, amp: bool, device: torch.device, args) -> dict:
    """kimg/s of the fine-tune loop."""
    G, D, what = networks(resolution, device, args)
    resolution = G.resolution
    images = np.random.default_rng(0).integers(0, 256, (32, resolution, resolution, 3), dtype=np.uint8)
    s = FinetuneSettings(batch=batch, aug="diffaug", mixed_precision=amp)
    trainer = Trainer(G, D, images, s.train_config(resolution))
    timed_step(trainer)  # step 0: warm-up (and an R1 step)
    plain = sorted(timed_step(trainer) for _ in range(args.steps))[args.steps // 2]
    every = trainer.cfg.r1_every
    trainer.step_count = every  # the next step regularises
    r1_extra = max(0.0, timed_step(trainer) - plain)
    per_step = plain + r1_extra / every
    return {"net": what, "res": resolution, "batch": batch, "amp": trainer.amp, "s_step": plain, "r1_extra": r1_extra,
            "kimg_s": batch / per_step / 1000}  # fmt: skip


def compare(device: torch.device, args) -> list[dict]:
    """Each recipe from the same base for the same kimg; KID against the training set and held-out toons."""
    G_base, D_base = load_generator(args.base, device), load_discriminator(args.base, device)
    res = G_base.resolution
    train = make_dataset(args.images, "toon", res, seed=args.seed)
    heldout = make_dataset(args.heldout, "toon", res, seed=args.seed + 1)
    features = DiscriminatorFeatures(D_base)
    f_train, f_held = features(from_uint8(train)), features(from_uint8(heldout))
    z = torch.randn(args.samples, G_base.z_dim, generator=torch.Generator().manual_seed(123))
    f_base = features(render(G_base, z))
    rows = [{"recipe": "base (no training)", "kimg": 0.0, "aug_p": None, "kid_train": kid(f_train, f_base),
             "kid_heldout": kid(f_held, f_base), "seconds": 0.0}]  # fmt: skip
    for name in args.recipes.split(","):
        s = FinetuneSettings(batch=args.batch, seed=args.seed, ada_kimg=args.ada_kimg, **RECIPES[name])
        trainer = Trainer(copy.deepcopy(G_base), copy.deepcopy(D_base), train, s.train_config(res))
        t0 = time.perf_counter()
        trainer.train(kimg=args.kimg)
        sync(device)
        fake = features(render(trainer.G_ema, z))
        aug_p = trainer.aug_p if trainer.cfg.policies else None  # no augmentation: no probability
        rows.append({"recipe": name, "kimg": trainer.nimg / 1000, "aug_p": aug_p,
                     "kid_train": kid(f_train, fake), "kid_heldout": kid(f_held, fake),
                     "seconds": time.perf_counter() - t0})  # fmt: skip
        print(f"  {name}: done in {rows[-1]['seconds']:.0f} s", file=sys.stderr)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolutions", default="64,256", help="config-f sizes; 'demo' for the demo base model")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--amp", default="off", help="off, on or off,on (bfloat16 autocast; CUDA only)")
    p.add_argument("--channel-multiplier", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps without R1 (median)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--compare", action="store_true", help="KID per fine-tune recipe at equal kimg")
    p.add_argument("--base", default=str(DEMO_BASE), help="compare: base checkpoint with a discriminator")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--kimg", type=float, default=20.0, help="compare: training length per recipe")
    p.add_argument("--images", type=int, default=100, help="compare: training toons (small, as communities have)")
    p.add_argument("--heldout", type=int, default=1000, help="compare: fresh toons for the held-out KID")
    p.add_argument("--samples", type=int, default=1000, help="compare: generated images per KID")
    p.add_argument("--ada-kimg", type=float, default=100.0, help="compare: ADA speed (kimg for p to move by 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = f"torch {torch.__version__}, {device.type}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        env += f", {torch.cuda.get_device_name(device)}"

    if args.compare:
        rows = compare(device, args)
        print(f"# fine-tune recipes at equal kimg; base {Path(args.base).name}; {args.images} training toons; {env}")
        print("| recipe | kimg | final aug p | KID vs training set | KID vs held-out toons | seconds |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            p_text = "-" if r["aug_p"] is None else f"{r['aug_p']:.3f}"
            print(f"| {r['recipe']} | {r['kimg']:.3f} | {p_text} | {r['kid_train']:.4f} | "
                  f"{r['kid_heldout']:.4f} | {r['seconds']:.0f} |")  # fmt: skip
        return

    print(f"# fine-tune training speed; {env}")
    print("| networks | res | batch | mixed precision | s/step (no R1) | R1 step extra s | kimg/s |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for res in (r.strip() for r in args.resolutions.split(",")):
        for amp in (a.strip() == "on" for a in args.amp.split(",")):
            r = speed(res, args.batch, amp, device, args)
            mp = "bf16 autocast" if r["amp"] else "off (fp32)"
            print(f"| {r['net']} | {r['res']} | {r['batch']} | {mp} | {r['s_step']:.3f} | {r['r1_extra']:.3f} "
                  f"| {r['kimg_s']:.3g} |")  # fmt: skip
            sys.stdout.flush()


if __name__ == "__main__":
    main()
