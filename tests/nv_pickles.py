"""Write pickles in NVIDIA's real StyleGAN2 formats from our own networks (test helper).

* stylegan2-ada-pytorch: a dict ``{G, D, G_ema, augment_pipe, training_set_kwargs}`` whose modules pickle
  as ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, ``meta['state']`` being the module's
  ``__dict__`` (``_parameters``, ``_buffers``, ``_modules``, ``_init_kwargs``, plain attributes).
* TensorFlow StyleGAN2: a tuple ``(G, D, Gs)`` of ``dnnlib.tflib.network.Network`` objects whose state holds
  numpy variables in TF layouts.

The NVIDIA modules are faked in ``sys.modules`` only while pickling, so loading proves no dependency on them;
the fake ``_reconstruct_persistent_obj`` raises if anything ever calls it.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gan.networks import Discriminator, Generator

_MODULE_SRC = "# stand-in for training/networks.py: never executed by the loader\nraise RuntimeError('executed')\n"


def _reconstruct_persistent_obj(meta: dict) -> None:
    raise AssertionError("the NVIDIA persistence hook must never be called when loading")


class EasyDict(dict):
    """Pickles as ``dnnlib.util.EasyDict`` (the class name is patched while the fake module is active)."""


class Network:
    """Pickles as ``dnnlib.tflib.network.Network`` with the TF release's ``__getstate__`` layout."""

    def __init__(self, name: str, static_kwargs: dict, variables: dict, components: dict | None = None) -> None:
        self.name, self.static_kwargs, self.variables = name, static_kwargs, variables
        self.components = components or {}

    def __getstate__(self) -> dict:
        return {
            "version": 4,
            "name": self.name,
            "static_kwargs": dict(self.static_kwargs),
            "components": dict(self.components),
            "build_module_src": _MODULE_SRC,
            "build_func_name": f"G_{self.name}",
            "variables": [(k, np.array(v, dtype=np.float32, order="C")) for k, v in self.variables.items()],
        }


class Persistent:
    """A module of NVIDIA's ``training/networks.py`` as its ``persistent_class`` decorator pickles it."""

    def __init__(self, class_name: str, params=None, buffers=None, modules=None, init_kwargs=None, **attrs) -> None:
        self.class_name = class_name
        self.state = {
            "training": False,
            "_parameters": OrderedDict((k, torch.nn.Parameter(v.clone())) for k, v in (params or {}).items()),
            "_buffers": OrderedDict((k, v.clone()) for k, v in (buffers or {}).items()),
            "_non_persistent_buffers_set": set(),
            "_backward_hooks": OrderedDict(),
            "_forward_hooks": OrderedDict(),
            "_forward_pre_hooks": OrderedDict(),
            "_state_dict_hooks": OrderedDict(),
            "_load_state_dict_pre_hooks": OrderedDict(),
            "_modules": OrderedDict(modules or {}),
            "_init_args": (),
            "_init_kwargs": EasyDict(init_kwargs or {}),
            **attrs,
        }

    def __reduce__(self):
        meta = {"type": "class", "version": 6, "module_src": _MODULE_SRC, "class_name": self.class_name}
        return _reconstruct_persistent_obj, ({**meta, "state": self.state},)


@contextlib.contextmanager
def _fake_nvidia_modules() -> Iterator[None]:
    names = ["torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util", "dnnlib.tflib", "dnnlib.tflib.network"]
    saved = {n: sys.modules.get(n) for n in names}
    mods = {n: types.ModuleType(n) for n in names}
    for obj, mod in ((_reconstruct_persistent_obj, "torch_utils.persistence"), (EasyDict, "dnnlib.util")):
        obj.__module__ = mod
        setattr(mods[mod], obj.__name__, obj)
    Network.__module__ = "dnnlib.tflib.network"
    mods["dnnlib.tflib.network"].Network = Network
    sys.modules.update(mods)
    try:
        yield
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
        for obj in (_reconstruct_persistent_obj, EasyDict, Network):
            obj.__module__ = __name__


def dump(obj: object, path: str | Path, protocol: int = 3) -> Path:
    """Pickle ``obj`` with the fake NVIDIA modules registered only for the duration."""
    path = Path(path)
    with _fake_nvidia_modules(), open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


# ----------------------------------------------------------------------------------------------------------
# stylegan2-ada-pytorch


def _fc(weight: torch.Tensor, bias: torch.Tensor, activation: str, lr: float = 1.0) -> Persistent:
    return Persistent(
        "FullyConnectedLayer",
        params={"weight": weight, "bias": bias},
        activation=activation,
        weight_gain=np.float64(lr / math.sqrt(weight.shape[1])),  # NVIDIA computes these with numpy
        bias_gain=lr,
    )


def _synthesis_layer(sd: dict, src: str, r: int, up: int, noise: torch.Tensor, filt: torch.Tensor) -> Persistent:
    w = sd[f"{src}.conv.weight"][0]
    return Persistent(
        "SynthesisLayer",
        params={"weight": w, "noise_strength": sd[f"{src}.noise.weight"][0], "bias": sd[f"{src}.activate.bias"]},
        buffers={"resample_filter": filt, "noise_const": noise.reshape(r, r)},
        modules={"affine": _fc(sd[f"{src}.conv.modulation.weight"], sd[f"{src}.conv.modulation.bias"], "linear")},
        init_kwargs={"resolution": r, "up": up},
        resolution=r,
        up=up,
        use_noise=True,
        activation="lrelu",
        conv_clamp=None,
        padding=1,
        act_gain=math.sqrt(2),
    )


def _torgb(sd: dict, src: str) -> Persistent:
    w = sd[f"{src}.conv.weight"][0]
    mod = _fc(sd[f"{src}.conv.modulation.weight"], sd[f"{src}.conv.modulation.bias"], "linear")
    return Persistent(
        "ToRGBLayer",
        params={"weight": w, "bias": sd[f"{src}.bias"].reshape(-1)},
        modules={"affine": mod},
        conv_clamp=None,
        weight_gain=np.float64(1 / math.sqrt(w.shape[1])),
    )


def nv_generator(G: Generator) -> Persistent:
    """Our generator as NVIDIA's persistent ``Generator`` (mapping + synthesis)."""
    sd = {k: v.detach().cpu() for k, v in G.state_dict().items()}
    cfg, filt = G.config, G.convs[0].conv.blur.kernel.detach().cpu() / 4  # NVIDIA's filters sum to 1
    noises = G.noise_buffers()
    blocks = {}
    for log_r in range(2, G.log_size + 1):
        r, k = 2**log_r, log_r - 3
        mods = {}
        params = {}
        if r == 4:
            params["const"] = sd["input.input"][0]
            mods["conv1"] = _synthesis_layer(sd, "conv1", 4, 1, noises[0], filt)
            mods["torgb"] = _torgb(sd, "to_rgb1")
        else:
            mods["conv0"] = _synthesis_layer(sd, f"convs.{2 * k}", r, 2, noises[2 * k + 1], filt)
            mods["conv1"] = _synthesis_layer(sd, f"convs.{2 * k + 1}", r, 1, noises[2 * k + 2], filt)
            mods["torgb"] = _torgb(sd, f"to_rgbs.{k}")
        blocks[f"b{r}"] = Persistent(
            "SynthesisBlock",
            params=params,
            buffers={"resample_filter": filt},
            modules=mods,
            in_channels=0 if r == 4 else cfg.channels[r // 2],
            w_dim=cfg.w_dim,
            resolution=r,
            img_channels=3,
            is_last=r == cfg.resolution,
            architecture="skip",
            use_fp16=False,
            channels_last=False,
            num_conv=1 if r == 4 else 2,
            num_torgb=1,
        )
    synthesis = Persistent(
        "SynthesisNetwork",
        modules=blocks,
        init_kwargs={"w_dim": cfg.w_dim, "img_resolution": cfg.resolution, "img_channels": 3},
        w_dim=cfg.w_dim,
        img_resolution=cfg.resolution,
        img_resolution_log2=G.log_size,
        img_channels=3,
        block_resolutions=[2**i for i in range(2, G.log_size + 1)],
        num_ws=G.num_ws,
    )
    style = [(sd[f"style.{i + 1}.weight"], sd[f"style.{i + 1}.bias"]) for i in range(cfg.n_mlp)]
    fcs = {f"fc{i}": _fc(w, b, "lrelu", cfg.lr_mlp) for i, (w, b) in enumerate(style)}
    mapping = Persistent(
        "MappingNetwork",
        buffers={"w_avg": G.w_avg.detach().cpu()},
        modules=fcs,
        init_kwargs={"z_dim": cfg.z_dim, "c_dim": 0, "w_dim": cfg.w_dim, "num_ws": G.num_ws, "num_layers": cfg.n_mlp},
        z_dim=cfg.z_dim,
        c_dim=0,
        w_dim=cfg.w_dim,
        num_ws=G.num_ws,
        num_layers=cfg.n_mlp,
        w_avg_beta=0.995,
    )
    kwargs = {
        "z_dim": cfg.z_dim,
        "c_dim": 0,
        "w_dim": cfg.w_dim,
        "img_resolution": cfg.resolution,
        "img_channels": 3,
        "mapping_kwargs": EasyDict(num_layers=cfg.n_mlp),
        "synthesis_kwargs": EasyDict(channel_base=32768, channel_max=512, num_fp16_res=0, conv_clamp=None),
    }
    return Persistent(
        "Generator",
        modules={"synthesis": synthesis, "mapping": mapping},
        init_kwargs=kwargs,
        **{k: v for k, v in kwargs.items() if not k.endswith("_kwargs")},
        num_ws=G.num_ws,
    )


def _conv(weight: torch.Tensor, bias: torch.Tensor | None, filt: torch.Tensor, down: int, act: str) -> Persistent:
    params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    attrs = {} if bias is not None else {"bias": None}  # NVIDIA keeps a bias-free layer's bias as None
    return Persistent(
        "Conv2dLayer",
        params=params,
        buffers={"resample_filter": filt},
        activation=act,
        up=1,
        down=down,
        conv_clamp=None,
        padding=weight.shape[-1] // 2,
        weight_gain=np.float64(1 / math.sqrt(weight[0].numel())),
        act_gain=math.sqrt(2) if act == "lrelu" else 1.0,
        **attrs,
    )


def nv_discriminator(D: Discriminator, mbstd_group: int = 4) -> Persistent:
    """Our discriminator as NVIDIA's persistent 'resnet' ``Discriminator``."""
    sd = {k: v.detach().cpu() for k, v in D.state_dict().items()}
    filt = sd["convs.1.conv2.0.kernel"]
    res, log = D.resolution, int(math.log2(D.resolution))
    blocks = {}
    for i, log_r in enumerate(range(log, 2, -1), start=1):
        r, p = 2**log_r, f"convs.{i}"
        mods = {}
        if r == res:
            mods["fromrgb"] = _conv(sd["convs.0.0.weight"], sd["convs.0.1.bias"], filt, 1, "lrelu")
        mods["conv0"] = _conv(sd[f"{p}.conv1.0.weight"], sd[f"{p}.conv1.1.bias"], filt, 1, "lrelu")
        mods["conv1"] = _conv(sd[f"{p}.conv2.1.weight"], sd[f"{p}.conv2.2.bias"], sd[f"{p}.conv2.0.kernel"], 2, "lrelu")
        mods["skip"] = _conv(sd[f"{p}.skip.1.weight"], None, sd[f"{p}.skip.0.kernel"], 2, "linear")
        blocks[f"b{r}"] = Persistent(
            "DiscriminatorBlock",
            buffers={"resample_filter": filt},
            modules=mods,
            in_channels=0 if r == res else D.channels[r],
            resolution=r,
            img_channels=3,
            first_layer_idx=0,
            architecture="resnet",
            use_fp16=False,
            channels_last=False,
            num_layers=len(mods),
        )
    c4 = D.channels[4]
    blocks["b4"] = Persistent(
        "DiscriminatorEpilogue",
        modules={
            "mbstd": Persistent("MinibatchStdLayer", group_size=mbstd_group, num_channels=1),
            "conv": _conv(sd["final_conv.0.weight"], sd["final_conv.1.bias"], filt, 1, "lrelu"),
            "fc": _fc(sd["final_linear.0.weight"], sd["final_linear.0.bias"], "lrelu"),
            "out": _fc(sd["final_linear.1.weight"], sd["final_linear.1.bias"], "linear"),
        },
        in_channels=c4,
        cmap_dim=0,
        resolution=4,
        img_channels=3,
        architecture="resnet",
    )
    kwargs = {
        "c_dim": 0,
        "img_resolution": res,
        "img_channels": 3,
        "architecture": "resnet",
        "block_kwargs": EasyDict(),
        "mapping_kwargs": EasyDict(),
        "epilogue_kwargs": EasyDict(mbstd_group_size=mbstd_group),
    }
    return Persistent(
        "Discriminator",
        modules=blocks,
        init_kwargs=kwargs,
        c_dim=0,
        img_resolution=res,
        img_resolution_log2=log,
        img_channels=3,
        block_resolutions=[2**i for i in range(log, 2, -1)],
    )


def write_nv_pytorch_pickle(path: str | Path, G: Generator, D: Discriminator | None = None, protocol: int = 3) -> Path:
    """A stylegan2-ada-pytorch snapshot: ``G`` and ``G_ema`` from ``G``, ``D`` from ``D`` when given."""
    data = {
        "G": nv_generator(G),
        "D": None if D is None else nv_discriminator(D),
        "G_ema": nv_generator(G),
        "augment_pipe": None,
        "training_set_kwargs": EasyDict(class_name="training.dataset.ImageFolderDataset", resolution=G.resolution),
    }
    return dump(data, path, protocol)


# ----------------------------------------------------------------------------------------------------------
# TensorFlow StyleGAN2


def _tf_conv(w: torch.Tensor, flip: bool = False) -> np.ndarray:
    a = w.detach().cpu().numpy().transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
    return a[::-1, ::-1] if flip else a


def _tf_modconv(sd: dict, src: str, noise: bool = True, flip: bool = False) -> dict[str, np.ndarray]:
    out = {
        "weight": _tf_conv(sd[f"{src}.conv.weight"][0], flip),
        "mod_weight": sd[f"{src}.conv.modulation.weight"].numpy().T,
        "mod_bias": sd[f"{src}.conv.modulation.bias"].numpy() - 1,  # TF adds the 1 at run time
    }
    if noise:
        out["noise_strength"] = sd[f"{src}.noise.weight"].numpy().reshape(())
        out["bias"] = sd[f"{src}.activate.bias"].numpy()
    else:
        out["bias"] = sd[f"{src}.bias"].numpy().reshape(-1)
    return out


def _tf_gs(G: Generator, name: str) -> Network:
    sd = {k: v.detach().cpu() for k, v in G.state_dict().items()}
    cfg = G.config
    mapping = {}
    for i in range(cfg.n_mlp):
        mapping[f"Dense{i}/weight"] = sd[f"style.{i + 1}.weight"].numpy().T
        mapping[f"Dense{i}/bias"] = sd[f"style.{i + 1}.bias"].numpy()
    syn = {f"noise{j}": b.detach().cpu().numpy() for j, b in enumerate(G.noise_buffers())}
    syn["4x4/Const/const"] = sd["input.input"].numpy()
    layers = {"4x4/Conv": _tf_modconv(sd, "conv1"), "4x4/ToRGB": _tf_modconv(sd, "to_rgb1", noise=False)}
    for k in range(G.log_size - 2):
        r = 8 * 2**k
        layers[f"{r}x{r}/Conv0_up"] = _tf_modconv(sd, f"convs.{2 * k}", flip=True)
        layers[f"{r}x{r}/Conv1"] = _tf_modconv(sd, f"convs.{2 * k + 1}")
        layers[f"{r}x{r}/ToRGB"] = _tf_modconv(sd, f"to_rgbs.{k}", noise=False)
    syn.update({f"{scope}/{v}": a for scope, d in layers.items() for v, a in d.items()})
    common = {"num_channels": 3, "resolution": cfg.resolution, "label_size": 0}
    kwargs = {
        **common,
        "latent_size": cfg.z_dim,
        "dlatent_size": cfg.w_dim,
        "mapping_layers": cfg.n_mlp,
        "fmap_base": cfg.channels[cfg.resolution] * cfg.resolution // 2,
        "fmap_max": max(cfg.channels.values()),
    }
    return Network(
        name,
        kwargs,
        {"lod": np.float32(0), "dlatent_avg": G.w_avg.detach().cpu().numpy()},
        {
            "mapping": Network("G_mapping", {"latent_size": cfg.z_dim, "dlatent_size": cfg.w_dim}, mapping),
            "synthesis": Network("G_synthesis", {**common, "dlatent_size": cfg.w_dim}, syn),
        },
    )


def _tf_d(D: Discriminator, mbstd_group: int = 4) -> Network:
    sd = {k: v.detach().cpu() for k, v in D.state_dict().items()}
    res, log = D.resolution, int(math.log2(D.resolution))
    top = f"{res}x{res}/FromRGB"
    v = {f"{top}/weight": _tf_conv(sd["convs.0.0.weight"]), f"{top}/bias": sd["convs.0.1.bias"]}
    for i, log_r in enumerate(range(log, 2, -1), start=1):
        r, p = 2**log_r, f"convs.{i}"
        v[f"{r}x{r}/Conv0/weight"] = _tf_conv(sd[f"{p}.conv1.0.weight"])
        v[f"{r}x{r}/Conv0/bias"] = sd[f"{p}.conv1.1.bias"]
        v[f"{r}x{r}/Conv1_down/weight"] = _tf_conv(sd[f"{p}.conv2.1.weight"])
        v[f"{r}x{r}/Conv1_down/bias"] = sd[f"{p}.conv2.2.bias"]
        v[f"{r}x{r}/Skip/weight"] = _tf_conv(sd[f"{p}.skip.1.weight"])
    v["4x4/Conv/weight"] = _tf_conv(sd["final_conv.0.weight"])
    v["4x4/Conv/bias"] = sd["final_conv.1.bias"]
    for tf_name, ours in (("4x4/Dense0", "final_linear.0"), ("Output", "final_linear.1")):
        v[f"{tf_name}/weight"] = sd[f"{ours}.weight"].numpy().T
        v[f"{tf_name}/bias"] = sd[f"{ours}.bias"]
    v = {k: np.asarray(a) for k, a in v.items()}
    kwargs = {"num_channels": 3, "resolution": res, "label_size": 0, "mbstd_group_size": mbstd_group}
    return Network("D", {**kwargs, "fmap_base": D.channels[res] * res // 2, "fmap_max": max(D.channels.values())}, v)


def write_nv_tf_pickle(path: str | Path, G: Generator, D: Discriminator, protocol: int = 3) -> Path:
    """A TensorFlow StyleGAN2 ``(G, D, Gs)`` pickle; ``G`` and ``Gs`` both from ``G``."""
    return dump((_tf_gs(G, "G"), _tf_d(D), _tf_gs(G, "Gs")), path, protocol)
