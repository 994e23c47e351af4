"""NVIDIA StyleGAN2 pickles: stylegan2-ada-pytorch ``.pkl`` and the original TensorFlow release ``.pkl``.

Both are unpickled by :mod:`gan.checkpoints.safe_pickle`, so no NVIDIA code is imported or executed (the
``module_src`` embedded in PyTorch pickles is dropped unread). TensorFlow variables are first renamed and
re-laid-out to NVIDIA's PyTorch names; one mapping then takes those onto rosinality's names. Architectures
our networks cannot represent (conditional, 'orig'/'resnet' generators, other activations) are refused.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gan.checkpoints.common import (
    CheckpointData,
    CheckpointError,
    check_architecture,
    check_declared_bytes,
    check_generator_config,
    check_state_fits,
)
from gan.checkpoints.safe_pickle import PersistentObject, TFNetworkStub, UnsafePickleError, safe_load
from gan.networks import (
    BLUR_TAPS,
    Discriminator,
    Generator,
    discriminator_channels_from_state_dict,
    generator_config_from_state_dict,
    make_kernel,
)

# Hyper-parameters with the only values we can represent (None = left at the default).
_G_SUPPORTED = {"c_dim": (0,), "img_channels": (3,), "architecture": ("skip",)}
_D_SUPPORTED = {**_G_SUPPORTED, "architecture": ("resnet",), "cmap_dim": (0,), "num_channels": (1,)}
_TF_COMMON = {"label_size": (0, None), "num_channels": (3, None), "nonlinearity": ("lrelu", None)}
_TF_COMMON["resample_kernel"] = ([1, 3, 3, 1], (1, 3, 3, 1), None)
_TF_G_SUPPORTED = {**_TF_COMMON, "architecture": ("skip", None), "mapping_nonlinearity": ("lrelu", None)}
_TF_D_SUPPORTED = {**_TF_COMMON, "architecture": ("resnet", None), "mbstd_num_features": (1, None)}


def read_nvidia_pickle(path: str | Path) -> CheckpointData:
    """Read an NVIDIA StyleGAN2 pickle (PyTorch or TensorFlow); :class:`CheckpointError` on anything else."""
    obj = _unpickle(path)
    file_size = Path(path).stat().st_size  # what the tensors a network declares must fit in
    try:
        if isinstance(obj, dict) and isinstance(obj.get("G_ema", obj.get("G")), PersistentObject):
            return _from_pytorch(obj, file_size)
        if isinstance(obj, tuple) and len(obj) == 3 and all(isinstance(n, TFNetworkStub) for n in obj):
            return _from_tf(obj[2], obj[1], file_size)
        kind = f"dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"unexpected pickle content ({kind}); expected an NVIDIA StyleGAN2 network pickle")
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: malformed NVIDIA pickle ({type(e).__name__}: {e})") from e


def _unpickle(path: str | Path) -> Any:
    try:
        with open(path, "rb") as f:
            return safe_load(f)
    except UnsafePickleError as e:
        raise CheckpointError(f"{path}: refused: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
    except Exception as e:  # any failure while parsing untrusted bytes just means a bad file
        raise CheckpointError(f"{path}: unreadable or truncated pickle ({type(e).__name__}: {e})") from e


def _check(values: dict[str, Any], supported: dict[str, tuple], where: str) -> None:
    for key, allowed in supported.items():
        if key in values and values[key] not in allowed:
            ok = [a for a in allowed if a is not None]
            raise CheckpointError(f"{where}: {key}={values[key]!r} cannot be represented (supported: {ok})")


# ----------------------------------------------------------------------------------------------------------
# NVIDIA PyTorch pickles: recurse the persistent modules' pickled __dict__


def _walk(obj: Any, prefix: str, tensors: dict[str, Tensor], modules: dict[str, dict]) -> None:
    """Flatten a persistent module into NVIDIA's dotted tensor names; keep each module's attributes."""
    where = prefix or "top level"
    if not isinstance(obj, PersistentObject) or not isinstance(obj.state, dict):
        raise CheckpointError(f"{where} is not an NVIDIA network module ({type(obj).__name__})")
    modules[prefix] = obj.state
    for key in ("_parameters", "_buffers"):
        for name, t in (obj.state.get(key) or {}).items():
            if t is None:
                continue
            if not torch.is_tensor(t):
                raise CheckpointError(f"{where}.{name} is not a tensor ({type(t).__name__})")
            tensors[f"{prefix}{name}"] = t.detach()
    for name, sub in (obj.state.get("_modules") or {}).items():
        if sub is not None:
            _walk(sub, f"{prefix}{name}.", tensors, modules)


def _flatten_module(obj: PersistentObject, class_name: str, supported: dict, file_size: int) -> tuple[dict, dict]:
    if obj.class_name != class_name:
        raise CheckpointError(f"expected an NVIDIA {class_name}, found {obj.class_name or 'an unnamed object'}")
    tensors: dict[str, Tensor] = {}
    modules: dict[str, dict] = {}
    _walk(obj, "", tensors, modules)
    check_declared_bytes(tensors.items(), file_size, f"NVIDIA {class_name}")  # before any copy below
    tensors = {name: t.float().contiguous() for name, t in tensors.items()}
    for path, state in modules.items():
        _check(state, supported, f"{class_name} '{path.rstrip('.') or 'top level'}'")
        act = state.get("activation")
        # Affine, skip and output layers are linear in StyleGAN2; every other layer is leaky ReLU.
        want = "linear" if path.rstrip(".").rsplit(".", 1)[-1] in ("affine", "skip", "out") else "lrelu"
        if act is not None and act != want:
            raise CheckpointError(f"{class_name} layer '{path.rstrip('.')}' uses activation {act!r}, not {want!r}")
    return tensors, modules


def _from_pytorch(obj: dict, file_size: int) -> CheckpointData:
    tensors, modules = _flatten_module(obj.get("G_ema", obj.get("G")), "Generator", _G_SUPPORTED, file_size)
    lr_mlp = float(modules.get("mapping.fc0.", {}).get("bias_gain", 0.01))  # bias_gain is the lr multiplier
    clamps = [s["conv_clamp"] for s in modules.values() if s.get("conv_clamp") is not None]
    meta: dict[str, Any] = {"source_format": "nvidia-pytorch", "conv_clamp": max(clamps, default=None)}
    data = _generator_data(tensors, lr_mlp, meta, "nvidia-pytorch")
    if isinstance(obj.get("D"), PersistentObject):
        try:
            d_tensors, d_modules = _flatten_module(obj["D"], "Discriminator", _D_SUPPORTED, file_size)
            group = d_modules.get("b4.mbstd.", {}).get("group_size", 4)
            _add_discriminator(data, d_tensors, None if group is None else int(group))
        except CheckpointError as e:  # the generator is still usable; say why D was left out
            data.meta["discriminator_unsupported"] = str(e)
    return data


# ----------------------------------------------------------------------------------------------------------
# NVIDIA PyTorch names -> rosinality names

_G_FIELDS = {
    "weight": "conv.weight",
    "affine.weight": "conv.modulation.weight",
    "affine.bias": "conv.modulation.bias",
    "bias": "activate.bias",
    "noise_strength": "noise.weight",
    "resample_filter": "conv.blur.kernel",
}
_D_FIELDS = {  # NVIDIA layer -> field -> name inside our block (ConvLayer is a Sequential: [Blur,] conv, act)
    "fromrgb": {"weight": "0.weight", "bias": "1.bias"},
    "conv0": {"weight": "conv1.0.weight", "bias": "conv1.1.bias"},
    "conv1": {"weight": "conv2.1.weight", "bias": "conv2.2.bias", "resample_filter": "conv2.0.kernel"},
    "skip": {"weight": "skip.1.weight", "resample_filter": "skip.0.kernel"},
    "conv": {"weight": "final_conv.0.weight", "bias": "final_conv.1.bias"},
    "fc": {"weight": "final_linear.0.weight", "bias": "final_linear.0.bias"},
    "out": {"weight": "final_linear.1.weight", "bias": "final_linear.1.bias"},
}


def _log2(r: int) -> int:
    if r < 4 or r & (r - 1):
        raise CheckpointError(f"block resolution {r} is not a power of two >= 4")
    return int(math.log2(r))


def _map_synthesis(out: dict[str, Tensor], r: int, layer: str, field: str, t: Tensor) -> None:
    k, up = _log2(r) - 3, layer == "conv0"
    if layer == "torgb":
        dst = "to_rgb1" if r == 4 else f"to_rgbs.{k}"
    else:
        dst = "conv1" if r == 4 and layer == "conv1" else f"convs.{2 * k + (not up)}"
    if field == "noise_const":
        out[f"noises.noise_{0 if r == 4 else 2 * k + 1 + (not up)}"] = t.reshape(1, 1, r, r)
    elif field == "resample_filter":
        if up:  # only the upsampling conv filters; the same-resolution ones are unused buffers
            out[f"{dst}.{_G_FIELDS[field]}"] = t * 4  # our kernels carry the upsampling gain of 2x2
    elif layer == "torgb" and field == "bias":
        out[f"{dst}.bias"] = t.reshape(1, -1, 1, 1)
    elif field in _G_FIELDS:
        shape = {"weight": (1, *t.shape), "noise_strength": (1,)}.get(field, t.shape)
        out[f"{dst}.{_G_FIELDS[field]}"] = t.reshape(shape)
    else:
        raise CheckpointError(f"unexpected generator tensor 'synthesis.b{r}.{layer}.{field}'")


def _nv_generator_to_rosinality(nv: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
    out: dict[str, Tensor] = {}
    for name, t in nv.items():
        if m := re.fullmatch(r"mapping\.fc(\d+)\.(weight|bias)", name):
            out[f"style.{int(m[1]) + 1}.{m[2]}"] = t
        elif name == "synthesis.b4.const":
            out["input.input"] = t.unsqueeze(0)
        elif m := re.fullmatch(r"synthesis\.b(\d+)\.resample_filter", name):
            if int(m[1]) > 4:
                out[f"to_rgbs.{_log2(int(m[1])) - 3}.upsample.kernel"] = t * 4
        elif m := re.fullmatch(r"synthesis\.b(\d+)\.(conv0|conv1|torgb)\.(.+)", name):
            _map_synthesis(out, int(m[1]), m[2], m[3], t)
        elif name != "mapping.w_avg":
            raise CheckpointError(
                f"unexpected generator tensor '{name}': not a StyleGAN2 'skip' generator "
                "(conditional, 'resnet', StyleGAN3 or another network?)"
            )
    return out, nv.get("mapping.w_avg")


def _nv_discriminator_to_rosinality(nv: dict[str, Tensor]) -> dict[str, Tensor]:
    top = max((int(m[1]) for n in nv if (m := re.match(r"b(\d+)\.", n))), default=0)
    out: dict[str, Tensor] = {}
    for name, t in nv.items():
        m = re.fullmatch(r"b(\d+)\.(?:(\w+)\.)?(\w+)", name)
        if m is None or (m[3] != "resample_filter" and m[3] not in _D_FIELDS.get(m[2], {})):
            raise CheckpointError(f"unexpected discriminator tensor '{name}' (conditional or non-'resnet' D?)")
        r, layer, field = int(m[1]), m[2], m[3]
        if field not in _D_FIELDS.get(layer, {}):
            continue  # resampling filters of blocks and of layers that do not downsample are unused
        if layer == "fromrgb" and r != top:
            raise CheckpointError(f"discriminator has from-RGB layers below {top}px ('skip' architecture)")
        prefix = "" if r == 4 else "convs.0." if layer == "fromrgb" else f"convs.{_log2(top) - _log2(r) + 1}."
        out[prefix + _D_FIELDS[layer][field]] = t
    return out


def _fit(sd: dict[str, Tensor], module: torch.nn.Module, what: str) -> dict[str, Tensor]:
    """Check names and shapes against our module (built on the meta device); fill fixed buffers that the
    source does not store: resampling kernels (TF) and, for noise-free generators, zero noise."""
    gain = 4.0 if isinstance(module, Generator) else 1.0
    no_noise = not any(".noise." in k or k.startswith("noises.") for k in sd)
    for name, ref in module.state_dict().items():
        if name not in sd and name.endswith("kernel"):
            sd[name] = make_kernel(BLUR_TAPS, gain)
        elif name not in sd and no_noise and (".noise." in name or name.startswith("noises.")):
            sd[name] = torch.zeros(ref.shape)
    check_state_fits(sd, module, what)
    return {k: sd[k] for k in module.state_dict()}


def _generator_data(nv: dict[str, Tensor], lr_mlp: float, meta: dict, fmt: str) -> CheckpointData:
    sd, w_avg = _nv_generator_to_rosinality(nv)
    try:
        config = replace(generator_config_from_state_dict(sd), lr_mlp=lr_mlp)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    check_generator_config(config, "generator")  # before _fit fills noise buffers of the declared sizes
    with torch.device("meta"):  # names and shapes only: no memory, no random init
        template = Generator(config)
    return CheckpointData(
        generator_state=_fit(sd, template, "generator"),
        generator_config=config,
        w_avg=None if w_avg is None else w_avg.reshape(-1),
        meta=meta,
        source_format=fmt,
    )


def _add_discriminator(data: CheckpointData, nv: dict[str, Tensor], mbstd_group: int | None) -> None:
    sd = _nv_discriminator_to_rosinality(nv)
    try:
        resolution, channels = discriminator_channels_from_state_dict(sd)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    check_architecture("discriminator", resolution, channels)
    with torch.device("meta"):
        template = Discriminator(resolution=resolution, channels=channels)
    data.discriminator_state = _fit(sd, template, "discriminator")
    data.discriminator_config = (resolution, channels)
    data.meta["mbstd_group_size"] = mbstd_group  # NVIDIA configs use 4 or 8; None = whole batch


# ----------------------------------------------------------------------------------------------------------
# NVIDIA TensorFlow pickles: (G, D, Gs) network stubs with numpy variables in TF layouts

_TF_G_LAYERS = {"Conv": "conv1", "Conv0_up": "conv0", "Conv1": "conv1", "ToRGB": "torgb"}
_TF_G_FIELDS = {"mod_weight": "affine.weight", "mod_bias": "affine.bias"}
_TF_G_LAYER = re.compile(
    r"synthesis/(\d+)x\1/(Conv|Conv0_up|Conv1|ToRGB)/(weight|bias|mod_weight|mod_bias|noise_strength)"
)
_TF_D_LAYERS = {"FromRGB": "fromrgb", "Conv0": "conv0", "Conv1_down": "conv1", "Skip": "skip", "Conv": "conv"}


def _tf_variables(net: Any, prefix: str = "") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All variables of a network and its components ('mapping/Dense0/weight'), and the merged kwargs."""
    if not isinstance(net, TFNetworkStub):
        raise CheckpointError(f"TensorFlow component '{prefix}' is not a network ({type(net).__name__})")
    if int(net.get("version", 0)) < 4:
        raise CheckpointError(f"TensorFlow network pickle version {net.get('version')} is older than StyleGAN2's")
    variables = {prefix + str(name): np.asarray(value) for name, value in net["variables"]}
    for name, a in variables.items():  # numbers only: anything else would be converted at an unknown cost
        if a.dtype.kind not in "fiu" or a.dtype.itemsize == 0:
            raise CheckpointError(f"TensorFlow variable '{name}' holds {a.dtype}, not numbers")
    kwargs = dict(net.get("static_kwargs") or {})
    for name, comp in (net.get("components") or {}).items():
        sub_vars, sub_kwargs = _tf_variables(comp, f"{prefix}{name}/")
        variables.update(sub_vars)
        kwargs = {**sub_kwargs, **kwargs}
    return variables, kwargs


def _tf_array(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _tf_conv(a: np.ndarray, flip: bool = False) -> Tensor:
    # TF stores [kh, kw, in, out]; its transposed-conv upsampling uses the kernel spatially flipped.
    return _tf_array((a[::-1, ::-1] if flip else a).transpose(3, 2, 0, 1))


def _tf_generator_to_nv(tf: dict[str, np.ndarray]) -> dict[str, Tensor]:
    nv: dict[str, Tensor] = {}
    for name, a in tf.items():
        if name == "dlatent_avg":
            nv["mapping.w_avg"] = _tf_array(a)
        elif m := re.fullmatch(r"mapping/Dense(\d+)/(weight|bias)", name):
            nv[f"mapping.fc{m[1]}.{m[2]}"] = _tf_array(a.T)
        elif name == "synthesis/4x4/Const/const":
            nv["synthesis.b4.const"] = _tf_array(a[0])
        elif m := re.fullmatch(r"synthesis/noise(\d+)", name):
            j = int(m[1])
            r, layer = (4, "conv1") if j == 0 else (2 ** ((j + 5) // 2), "conv0" if j % 2 else "conv1")
            nv[f"synthesis.b{r}.{layer}.noise_const"] = _tf_array(a[0, 0])
        elif m := _TF_G_LAYER.fullmatch(name):
            field = m[3]
            if field == "weight":
                t = _tf_conv(a, flip=m[2] == "Conv0_up")
            else:  # TF adds the style bias's 1 at run time; NVIDIA PyTorch and rosinality store it
                t = _tf_array(a.T if field == "mod_weight" else a + 1 if field == "mod_bias" else a)
            nv[f"synthesis.b{m[1]}.{_TF_G_LAYERS[m[2]]}.{_TF_G_FIELDS.get(field, field)}"] = t
        elif not name.endswith("lod"):  # the progressive-growing level is unused by StyleGAN2
            raise CheckpointError(
                f"unexpected TensorFlow generator variable '{name}': not a StyleGAN2 'skip' generator"
            )
    return nv


def _tf_discriminator_to_nv(tf: dict[str, np.ndarray]) -> dict[str, Tensor]:
    nv: dict[str, Tensor] = {}
    for name, a in tf.items():
        if m := re.fullmatch(r"(\d+)x\1/(FromRGB|Conv0|Conv1_down|Skip|Conv)/(weight|bias)", name):
            nv[f"b{m[1]}.{_TF_D_LAYERS[m[2]]}.{m[3]}"] = _tf_conv(a) if m[3] == "weight" else _tf_array(a)
        elif m := re.fullmatch(r"(4x4/Dense0|Output)/(weight|bias)", name):
            nv[f"b4.{'fc' if m[1] == '4x4/Dense0' else 'out'}.{m[2]}"] = _tf_array(a.T)
        elif not name.endswith("lod"):
            raise CheckpointError(f"unexpected TensorFlow discriminator variable '{name}'")
    return nv


def _check_tf_bytes(variables: dict[str, np.ndarray], file_size: int, where: str) -> None:
    total = sum(a.nbytes for a in variables.values())
    if total > file_size:  # arrays unpickle from their own bytes, so this only guards crafted files
        raise CheckpointError(f"{where}: variables hold {total} bytes, more than the file's {file_size}")


def _from_tf(tf_gs: TFNetworkStub, tf_d: TFNetworkStub, file_size: int) -> CheckpointData:
    g_vars, g_kwargs = _tf_variables(tf_gs)
    _check_tf_bytes(g_vars, file_size, "TensorFlow generator")
    _check(g_kwargs, _TF_G_SUPPORTED, "TensorFlow generator")
    lr_mlp = float(g_kwargs.get("mapping_lrmul") or 0.01)
    meta = {"source_format": "nvidia-tf", "conv_clamp": g_kwargs.get("conv_clamp")}
    data = _generator_data(_tf_generator_to_nv(g_vars), lr_mlp, meta, "nvidia-tf")
    try:
        d_vars, d_kwargs = _tf_variables(tf_d)
        _check_tf_bytes(d_vars, file_size, "TensorFlow discriminator")
        _check(d_kwargs, _TF_D_SUPPORTED, "TensorFlow discriminator")
        group = d_kwargs.get("mbstd_group_size", 4)
        _add_discriminator(data, _tf_discriminator_to_nv(d_vars), None if group is None else int(group))
    except CheckpointError as e:
        data.meta["discriminator_unsupported"] = str(e)
    return data
