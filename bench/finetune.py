"""Fine-tuning speed (kimg/s) and, with --compare, the quality of fine-tune recipes at equal kimg (KID, FID).

    python bench/finetune.py                                   # CPU, 64 and 256 px, batch 8, fp32
    python bench/finetune.py --resolutions demo                # the demo base model's own networks
    python bench/finetune.py --device cuda --amp off,on        # GPU, fp32 and bfloat16 autocast
    python bench/finetune.py --compare                         # six recipes x 3 seeds, mean ± spread
    python bench/finetune.py --compare --kimg 0.5 --images 64  # a tiny CPU-sized comparison
    python bench/finetune.py --compare --quick                 # seconds: checks the bench runs (numbers meaningless)

Speed: config-f networks (channel multiplier 2) with random weights (speed does not depend on the values),
the fine-tune recipe of ``gan.finetune`` (FreezeD 2, DiffAugment colour/translation/cutout at p = 1, lazy R1
every 16 steps). A step without R1 is timed ``--steps`` times (median), the R1 step once; kimg/s amortises R1
over its interval. Compare: the demo base model fine-tuned on ``--images`` synthetic toons by each of the
seed's six recipes (baseline, FreezeD, DiffAugment, ADA, FreezeD + DiffAugment, FreezeD + ADA) for the same
kimg, once per training seed in ``--seeds`` (the data, the held-out toons and the latents rendered for the
metrics are the same for every run: only the training's randomness changes). KID on the base discriminator's
features against the training images and against ``--heldout`` fresh toons (synthetic data makes the held-out
set free: it tells generalisation from memorisation); FID and KID on Inception features too where
``TOONIFY_INCEPTION_PATH`` (or ``--inception``) names pytorch-fid's weight file. Prints per recipe the mean ±
sample standard deviation over the seeds and the range, then every run; ``--json`` writes all of it. Asserts
nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
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
from gan.inception import (  # noqa: E402
    InceptionFeatures,
    configured_inception_path,
    feature_statistics,
    frechet_distance,
)
from gan.networks import Discriminator, Generator, GeneratorConfig, default_channels  # noqa: E402
from gan.synthetic import make_dataset  # noqa: E402
from gan.training import Trainer  # noqa: E402

DEMO_BASE = ROOT / "gan" / "demo_models" / "base.safetensors"
RECIPES = {  # name -> (label, FinetuneSettings overrides): the seed's six rows
    "baseline": ("baseline", {"freeze_d": 0, "aug": "none"}),
    "freezed": ("FreezeD", {"freeze_d": 2, "aug": "none"}),
    "diffaug": ("DiffAugment (p = 1)", {"freeze_d": 0, "aug": "diffaug"}),
    "ada": ("ADA", {"freeze_d": 0, "aug": "ada"}),
    "freezed+diffaug": ("FreezeD + DiffAugment", {"freeze_d": 2, "aug": "diffaug"}),
    "freezed+ada": ("FreezeD + ADA", {"freeze_d": 2, "aug": "ada"}),
}
ALIASES = {"plain": "baseline"}  # the name earlier versions of this bench used
QUICK = {"kimg": 0.016, "images": 16, "heldout": 16, "samples": 16, "seeds": "0,1,2", "batch": 8}
METRICS = ("kid_train", "kid_heldout", "fid_train", "fid_heldout", "kid_inception_heldout")


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


def recipe_names(text: str) -> list[str]:
    names = [ALIASES.get(n.strip(), n.strip()) for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
    return names


class Scorer:
    """Metrics of generated images against the training set and the held-out toons."""

    def __init__(self, D_base, train: np.ndarray, heldout: np.ndarray, inception: InceptionFeatures | None) -> None:
        self.features, self.inception = DiscriminatorFeatures(D_base), inception
        self.f_train, self.f_held = self.features(from_uint8(train)), self.features(from_uint8(heldout))
        if inception is not None:
            self.i_train, self.i_held = inception(from_uint8(train)), inception(from_uint8(heldout))
            self.s_train, self.s_held = feature_statistics(self.i_train), feature_statistics(self.i_held)

    def __call__(self, images: torch.Tensor) -> dict:
        fake = self.features(images)
        out = {"kid_train": kid(self.f_train, fake), "kid_heldout": kid(self.f_held, fake)}
        if self.inception is not None:
            i_fake = self.inception(images)
            s_fake = feature_statistics(i_fake)
            out.update(fid_train=frechet_distance(*self.s_train, *s_fake),
                       fid_heldout=frechet_distance(*self.s_held, *s_fake),
                       kid_inception_heldout=kid(self.i_held, i_fake))  # fmt: skip
        return out


def compare(device: torch.device, args) -> dict:
    """Each recipe from the same base for the same kimg, once per training seed; metrics per run."""
    G_base, D_base = load_generator(args.base, device), load_discriminator(args.base, device)
    res = G_base.resolution
    train = make_dataset(args.images, "toon", res, seed=args.seed)
    heldout = make_dataset(args.heldout, "toon", res, seed=args.seed + 1)
    path = configured_inception_path(args.inception)
    inception = None if path is None else InceptionFeatures.from_path(path, device)
    score = Scorer(D_base, train, heldout, inception)
    z = torch.randn(args.samples, G_base.z_dim, generator=torch.Generator().manual_seed(123))
    base_row = {"recipe": "base", "label": "base (no training)", "seed": None, "kimg": 0.0, "aug_p": None,
                "seconds": 0.0, **score(render(G_base, z))}  # fmt: skip
    seeds = [int(x) for x in str(args.seeds).split(",")]
    runs = []
    for name in recipe_names(args.recipes):
        label, overrides = RECIPES[name]
        for seed in seeds:
            s = FinetuneSettings(batch=args.batch, seed=seed, ada_kimg=args.ada_kimg, **overrides)
            trainer = Trainer(copy.deepcopy(G_base), copy.deepcopy(D_base), train, s.train_config(res))
            t0 = time.perf_counter()
            trainer.train(kimg=args.kimg)
            sync(device)
            seconds = time.perf_counter() - t0
            aug_p = trainer.aug_p if trainer.cfg.policies else None  # no augmentation: no probability
            runs.append({"recipe": name, "label": label, "seed": seed, "kimg": trainer.nimg / 1000, "aug_p": aug_p,
                         "seconds": seconds, **score(render(trainer.G_ema, z))})  # fmt: skip
            print(f"  {label}, seed {seed}: done in {seconds:.0f} s", file=sys.stderr)
    return {"base": base_row, "runs": runs, "summary": summarise(runs), "seeds": seeds,
            "inception": None if inception is None else inception.description}  # fmt: skip


def summarise(runs: list[dict]) -> list[dict]:
    """Per recipe, in run order: mean, sample standard deviation and range of each metric over its seeds."""
    out = []
    for name in dict.fromkeys(r["recipe"] for r in runs):
        mine = [r for r in runs if r["recipe"] == name]
        row = {"recipe": name, "label": mine[0]["label"], "n": len(mine), "kimg": mine[0]["kimg"],
               "seconds": statistics.fmean(r["seconds"] for r in mine)}  # fmt: skip
        ps = [r["aug_p"] for r in mine if r["aug_p"] is not None]
        row["aug_p"] = statistics.fmean(ps) if ps else None
        for key in METRICS:
            values = [r[key] for r in mine if r.get(key) is not None]
            if values:
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                row[key] = {"mean": statistics.fmean(values), "sd": sd, "min": min(values), "max": max(values)}
        out.append(row)
    return out


def _spread(stat: dict | None, digits: int) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f} [{stat['min']:.{digits}f}, {stat['max']:.{digits}f}]"


def print_compare(result: dict, args, env: str) -> None:
    fid = result["inception"] is not None
    seeds = ",".join(map(str, result["seeds"]))
    print(f"# fine-tune recipes at equal kimg; base {Path(args.base).name}; {args.images} training toons, "
          f"{args.heldout} held out, {args.samples} samples; training seeds {seeds}; {env}")  # fmt: skip
    print("# KID on the base discriminator's features" + (f"; FID on {result['inception']}" if fid else
          "; FID: no Inception weights configured (TOONIFY_INCEPTION_PATH)"))  # fmt: skip
    print("# cells: mean ± sample standard deviation over the seeds [min, max]")
    head = ["recipe", "kimg", "final aug p", "KID vs training set", "KID vs held-out toons"]
    head += ["FID vs training set", "FID vs held-out toons"] if fid else []
    print("| " + " | ".join([*head, "seconds per run"]) + " |")
    print("| --- | " + " | ".join("---:" for _ in head[1:]) + " | ---: |")
    b = result["base"]
    cells = ["base (no training)", "0", "-", f"{b['kid_train']:.4f}", f"{b['kid_heldout']:.4f}"]
    cells += [f"{b['fid_train']:.2f}", f"{b['fid_heldout']:.2f}"] if fid else []
    print("| " + " | ".join([*cells, "0"]) + " |")
    for r in result["summary"]:
        p_text = "-" if r["aug_p"] is None else f"{r['aug_p']:.3f}"
        cells = [f"{r['label']} (n={r['n']})", f"{r['kimg']:.3f}", p_text]
        cells += [_spread(r.get("kid_train"), 4), _spread(r.get("kid_heldout"), 4)]
        cells += [_spread(r.get("fid_train"), 2), _spread(r.get("fid_heldout"), 2)] if fid else []
        print("| " + " | ".join([*cells, f"{r['seconds']:.0f}"]) + " |")
    print()
    fid_head = " | FID train | FID held-out |" if fid else " |"
    print("| recipe | seed | final aug p | KID train | KID held-out" + fid_head)
    print("| --- | ---: | ---: | ---: | ---:" + (" | ---: | ---: |" if fid else " |"))
    for r in result["runs"]:
        p_text = "-" if r["aug_p"] is None else f"{r['aug_p']:.3f}"
        cells = [r["label"], str(r["seed"]), p_text, f"{r['kid_train']:.4f}", f"{r['kid_heldout']:.4f}"]
        cells += [f"{r['fid_train']:.2f}", f"{r['fid_heldout']:.2f}"] if fid else []
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolutions", default="64,256", help="config-f sizes; 'demo' for the demo base model")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--amp", default="off", help="off, on or off,on (bfloat16 autocast; CUDA only)")
    p.add_argument("--channel-multiplier", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps without R1 (median)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--compare", action="store_true", help="KID (and FID) per fine-tune recipe at equal kimg")
    p.add_argument("--base", default=str(DEMO_BASE), help="compare: base checkpoint with a discriminator")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"compare: some of {', '.join(RECIPES)}")
    p.add_argument("--seeds", default="0,1,2", help="compare: training seeds, each recipe runs once per seed")
    p.add_argument("--kimg", type=float, default=20.0, help="compare: training length per recipe")
    p.add_argument("--images", type=int, default=100, help="compare: training toons (small, as communities have)")
    p.add_argument("--heldout", type=int, default=1000, help="compare: fresh toons for the held-out KID")
    p.add_argument("--samples", type=int, default=1000, help="compare: generated images per KID")
    p.add_argument("--ada-kimg", type=float, default=100.0, help="compare: ADA speed (kimg for p to move by 1)")
    p.add_argument("--seed", type=int, default=0, help="compare: seed of the synthetic training and held-out toons")
    p.add_argument("--inception", help="compare: pytorch-fid Inception weights (default $TOONIFY_INCEPTION_PATH)")
    p.add_argument("--json", help="compare: also write every run and the summary to this file")
    p.add_argument("--quick", action="store_true", help="compare: a seconds-long run that checks the bench works")
    args = p.parse_args()
    if args.quick:
        args.compare = True
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = f"torch {torch.__version__}, {device.type}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        env += f", {torch.cuda.get_device_name(device)}"

    if args.compare:
        result = compare(device, args)
        print_compare(result, args, env)
        if args.json:
            settings = {k: getattr(args, k) for k in ("base", "kimg", "images", "heldout", "samples", "ada_kimg",
                                                      "batch", "seed", "quick")}  # fmt: skip
            Path(args.json).write_text(json.dumps({**result, "settings": settings, "environment": env}, indent=2))
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
