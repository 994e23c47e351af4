"""NVIDIA StyleGAN2 pickles (stylegan2-ada-pytorch and TensorFlow) load safely and exactly."""

from __future__ import annotations

import builtins
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

import gan
from gan import CheckpointError
from gan.checkpoints import read_checkpoint
from tests.conftest import make_tiny_discriminator, make_tiny_generator
from tests.nv_pickles import EasyDict, dump, nv_discriminator, nv_generator, write_nv_pytorch_pickle, write_nv_tf_pickle

WRITERS = {"nvidia-pytorch": write_nv_pytorch_pickle, "nvidia-tf": write_nv_tf_pickle}
NV_MODULES = ("torch_utils", "dnnlib", "training")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("protocol", [2, 3, 4])  # NVIDIA wrote 3 (Python 3.6-3.7) or 4; re-saved files may be 2
@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_nvidia_pickle_matches_source(tmp_path: Path, fmt: str, protocol: int) -> None:
    G, D = make_tiny_generator(1), make_tiny_discriminator(2)
    path = WRITERS[fmt](tmp_path / "net.pkl", G, D, protocol=protocol)
    assert not any(m.split(".")[0] in NV_MODULES for m in sys.modules)  # nothing NVIDIA left to lean on

    G2 = gan.load_generator(path)
    assert G2.meta["source_format"] == fmt
    assert G2.config == G.config
    torch.testing.assert_close(G2.w_avg, G.w_avg, rtol=0, atol=0)
    ws = torch.randn(3, G.num_ws, G.w_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _max_diff(G2.synthesis(ws, noise_mode="const"), G.synthesis(ws, noise_mode="const")) < 1e-5
        z = torch.randn(2, G.z_dim)
        assert _max_diff(G2.mapping(z, truncation_psi=0.7), G.mapping(z, truncation_psi=0.7)) < 1e-6

    D2 = gan.load_discriminator(path)
    images = torch.randn(4, 3, G.resolution, G.resolution)
    with torch.no_grad():
        assert _max_diff(D2(images), D(images)) < 1e-5
    assert read_checkpoint(path).meta["mbstd_group_size"] == 4


def test_nvidia_pytorch_without_discriminator(tmp_path: Path) -> None:
    path = write_nv_pytorch_pickle(tmp_path / "g_only.pkl", make_tiny_generator(3))
    assert read_checkpoint(path).discriminator_state is None
    with pytest.raises(CheckpointError, match="no usable discriminator"):
        gan.load_discriminator(path)


def test_generator_without_noise_inputs(tmp_path: Path) -> None:
    """use_noise=False: no noise buffers or strengths in the pickle; we load zero noise."""
    G = make_tiny_generator(4)
    net = nv_generator(G)
    for block in net.state["_modules"]["synthesis"].state["_modules"].values():
        for name in ("conv0", "conv1"):
            if name in block.state["_modules"]:
                layer = block.state["_modules"][name].state
                layer["use_noise"] = False
                del layer["_parameters"]["noise_strength"], layer["_buffers"]["noise_const"]
    path = dump({"G": net, "D": None, "G_ema": net}, tmp_path / "no_noise.pkl")
    ws = torch.randn(2, G.num_ws, G.w_dim)
    with torch.no_grad():
        out = gan.load_generator(path).synthesis(ws, noise_mode="const")
        assert _max_diff(out, G.synthesis(ws, noise_mode="none")) < 1e-5


@pytest.mark.parametrize(
    ("where", "attr", "value", "message"),
    [
        ("", "c_dim", 5, "c_dim=5"),
        ("", "img_channels", 1, "img_channels=1"),
        ("synthesis.b8", "architecture", "resnet", "architecture='resnet'"),
        ("mapping.fc0", "activation", "relu", "activation 'relu'"),
    ],
)
def test_unrepresentable_generator_is_refused(tmp_path: Path, where: str, attr: str, value, message: str) -> None:
    net = nv_generator(make_tiny_generator(5))
    module = net
    for part in filter(None, where.split(".")):
        module = module.state["_modules"][part]
    module.state[attr] = value
    path = dump({"G": net, "D": None, "G_ema": net}, tmp_path / "odd.pkl")
    with pytest.raises(CheckpointError, match=message):
        gan.load_generator(path)


def test_unrepresentable_discriminator_is_left_out(tmp_path: Path) -> None:
    G, D = make_tiny_generator(6), nv_discriminator(make_tiny_discriminator(6))
    D.state["_modules"]["b32"].state["architecture"] = "skip"
    path = dump({"G": nv_generator(G), "D": D, "G_ema": nv_generator(G)}, tmp_path / "skip_d.pkl")
    data = read_checkpoint(path)
    assert data.discriminator_state is None
    assert "architecture='skip'" in data.meta["discriminator_unsupported"]
    gan.load_generator(path)  # the generator is still usable


class _Evil:
    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_pickle_calling_os_system_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    net = nv_generator(make_tiny_generator(7))
    net.state["payload"] = _Evil(os.system, f"touch {marker}")  # hidden deep inside a realistic snapshot
    path = dump({"G": net, "D": None, "G_ema": net}, tmp_path / "evil.pkl")
    with pytest.raises(CheckpointError, match=r"refused.*posix\.system"):
        gan.load_generator(path)
    assert not marker.exists()


@pytest.mark.parametrize("fn", [builtins.eval, builtins.exec, getattr])
def test_pickle_referencing_builtins_is_refused(tmp_path: Path, fn) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": _Evil(fn, "__import__('os').system('false')")}, protocol=3))
    with pytest.raises(CheckpointError, match=rf"refused.*builtins\.{fn.__name__}"):
        read_checkpoint(path)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_protocol_2_gives_the_same_weights_as_protocol_4(tmp_path: Path, fmt: str) -> None:
    """Protocol 2 stores bytes (numpy array data, torch storages) as ``_codecs.encode(text, 'latin1')`` and
    names Python 2 modules ('__builtin__.set'); the result must be bit-identical to protocol 4's."""
    G, D = make_tiny_generator(11), make_tiny_discriminator(12)
    old = WRITERS[fmt](tmp_path / "p2.pkl", G, D, protocol=2)
    new = WRITERS[fmt](tmp_path / "p4.pkl", G, D, protocol=4)
    assert b"_codecs\nencode" in old.read_bytes() and b"_codecs" not in new.read_bytes()
    a, b = read_checkpoint(old), read_checkpoint(new)
    assert a.generator_config == b.generator_config and a.discriminator_config == b.discriminator_config
    for mine, theirs in ((a.generator_state, b.generator_state), (a.discriminator_state, b.discriminator_state)):
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), name
    assert torch.equal(a.w_avg, b.w_avg) and a.meta["content_hash"] == b.meta["content_hash"]


class _Encode:
    """Pickles as ``_codecs.encode(*args)``."""

    def __init__(self, *args) -> None:
        self.args = args

    def __reduce__(self):
        import _codecs

        return _codecs.encode, self.args


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (_Encode("x" * 64, "zlib_codec"), "only on text with 'latin1'"),  # a bytes-to-bytes transform
        (_Encode("x", "rot13"), "only on text with 'latin1'"),
        (_Encode(b"bytes", "latin1"), "only on text with 'latin1'"),
        (_Evil(bytes, 10**12), "bytes\\(\\) with arguments"),  # would allocate a terabyte
        (_Evil(os.system, "false"), r"posix\.system"),
        (_Evil(builtins.eval, "1"), r"builtins\.eval"),  # written as '__builtin__ eval' by protocol 2
    ],
)
def test_protocol_2_codecs_and_builtins_are_limited(tmp_path: Path, payload, message: str) -> None:
    marker = tmp_path / "pwned"
    net = nv_generator(make_tiny_generator(13))
    net.state["payload"] = payload
    path = dump({"G": net, "D": None, "G_ema": net}, tmp_path / "evil.pkl", protocol=2)
    with pytest.raises(CheckpointError, match=f"refused.*{message}"):
        gan.load_generator(path)
    assert not marker.exists()


def test_protocol_2_pickle_calling_os_system_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": _Evil(os.system, f"touch {marker}")}, protocol=2))
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path)
    assert not marker.exists()


def test_truncated_pickle_is_refused(tmp_path: Path) -> None:
    full = write_nv_pytorch_pickle(tmp_path / "full.pkl", make_tiny_generator(8)).read_bytes()
    for cut in (len(full) // 3, len(full) - 5):
        path = tmp_path / f"cut{cut}.pkl"
        path.write_bytes(full[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            gan.load_generator(path)


@pytest.mark.parametrize(
    "obj",
    [
        {"weights": [1, 2, 3]},
        ("G", "D", "Gs"),
        EasyDict(G_ema=EasyDict(z_dim=512)),
        [torch.zeros(3)],
    ],
)
def test_unexpected_structure_is_refused(tmp_path: Path, obj) -> None:
    path = dump(obj, tmp_path / "odd.pkl")
    with pytest.raises(CheckpointError, match="unexpected pickle content"):
        read_checkpoint(path)


def test_unknown_network_class_is_refused(tmp_path: Path) -> None:
    net = nv_generator(make_tiny_generator(9))
    net.class_name = "StyleGAN3Generator"
    path = dump({"G": net, "D": None, "G_ema": net}, tmp_path / "sg3.pkl")
    with pytest.raises(CheckpointError, match="expected an NVIDIA Generator"):
        gan.load_generator(path)


def test_foreign_tensor_names_are_refused(tmp_path: Path) -> None:
    net = nv_generator(make_tiny_generator(10))
    synthesis = net.state["_modules"]["synthesis"]
    synthesis.state["_parameters"]["L0_weight"] = torch.nn.Parameter(torch.zeros(3))  # StyleGAN3-like
    path = dump({"G": net, "D": None, "G_ema": net}, tmp_path / "foreign.pkl")
    with pytest.raises(CheckpointError, match=r"unexpected generator tensor 'synthesis\.L0_weight'"):
        gan.load_generator(path)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_cli_converts_nvidia_pickles(tmp_path: Path, fmt: str, suffix: str) -> None:
    from gan.cli import main as cli_main

    G, D = make_tiny_generator(3), make_tiny_discriminator(4)
    src = WRITERS[fmt](tmp_path / "net.pkl", G, D)
    out = tmp_path / f"net{suffix}"
    assert cli_main(["convert", str(src), str(out)]) == 0
    G2, D2 = gan.load_generator(out), gan.load_discriminator(out)
    assert G2.meta["converted_from"] == {"path": "net.pkl", "format": fmt}
    ws = torch.randn(2, G.num_ws, G.w_dim)
    images = torch.randn(4, 3, G.resolution, G.resolution)
    with torch.no_grad():
        assert _max_diff(G2.synthesis(ws), G.synthesis(ws)) < 1e-5
        assert _max_diff(D2(images), D(images)) < 1e-5
