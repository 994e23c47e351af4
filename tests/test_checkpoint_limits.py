"""Small files that declare huge generators are refused with CheckpointError before anything is allocated.

Each crafted file is loaded in a subprocess that reports its peak resident set (``VmHWM`` in
/proc/self/status) before and after the load; the subprocess also runs under a 4 GB address-space limit, so
a regression fails as an allocation error instead of exhausting the machine.
"""

from __future__ import annotations

import json
import re
import resource
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import gan
from gan.checkpoints import CheckpointError, read_checkpoint, save_generator
from gan.checkpoints.common import MAX_CHANNELS, MAX_RESOLUTION, check_generator_config
from gan.networks import Generator, GeneratorConfig, default_channels
from tests.conftest import make_tiny_discriminator, make_tiny_generator
from tests.nv_pickles import _tf_d, _tf_gs, dump, nv_generator, write_nv_pytorch_pickle, write_nv_tf_pickle

REPO = Path(__file__).resolve().parents[1]
MB = 2**20

_LOADER = r"""
import json, sys

def peak() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

import gan
from gan.checkpoints import CheckpointError

for warm_up in sys.argv[2:]:  # real small files first, so lazy imports do not count as the load's growth
    gan.load_generator(warm_up)
before = peak()
try:
    gan.load_generator(sys.argv[1])
    outcome = "loaded"
except CheckpointError as e:
    outcome = "CheckpointError: " + str(e)
except BaseException as e:
    outcome = f"{type(e).__name__}: {e}"
print(json.dumps({"outcome": outcome, "grew": peak() - before}))
"""


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))


@pytest.fixture(scope="module")
def warm_up_files(tmp_path_factory) -> list[str]:
    """One small real checkpoint per format."""
    folder = tmp_path_factory.mktemp("warm_up")
    G, D = make_tiny_generator(5), make_tiny_discriminator(5)
    files = [save_generator(G, folder / "g.pt"), save_generator(G, folder / "g.safetensors")]
    files += [write_nv_pytorch_pickle(folder / "nv.pkl", G, D), write_nv_tf_pickle(folder / "tf.pkl", G, D)]
    return [str(f) for f in files]


def load_in_subprocess(path: Path, warm_up: list[str]) -> tuple[str, int]:
    """(outcome, bytes the peak resident set grew by while loading ``path``), measured after loading the
    ``warm_up`` files."""
    proc = subprocess.run(
        [sys.executable, "-c", _LOADER, str(path), *warm_up],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        preexec_fn=_limit_address_space,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report["outcome"], report["grew"]


def declared_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def huge_state_dict(channels: int = 4096, resolution: int = 1024) -> dict[str, torch.Tensor]:
    """A generator state dict whose every tensor is a stride-0 view of one stored float."""
    config = GeneratorConfig(resolution=resolution, channels=dict.fromkeys(default_channels(resolution), channels))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Generator(config).state_dict().items()}
    one = torch.zeros(1)
    return {k: one.expand(shape) for k, shape in shapes.items()}


# ------------------------------------------------------------------------------------------ .pt files


def test_pt_of_expanded_tensors_is_refused_without_allocating(tmp_path, warm_up_files):
    state = huge_state_dict()
    assert declared_bytes(state) > 10e9
    path = tmp_path / "huge.pt"
    torch.save({"g_ema": state, "latent_avg": torch.zeros(1).expand(4096)}, path)
    assert path.stat().st_size < 100_000
    outcome, grew = load_in_subprocess(path, warm_up_files)
    assert outcome.startswith("CheckpointError") and "expanded or overlapping" in outcome, outcome
    assert grew < 40 * MB, grew


def test_pt_expanded_within_the_architecture_limits_is_refused(tmp_path):
    """A sane config-f 256-px shape whose tensors are still views of nothing."""
    path = tmp_path / "views.pt"
    torch.save(huge_state_dict(channels=512, resolution=256), path)
    with pytest.raises(CheckpointError, match=r"declares .* but its data holds 4 bytes"):
        read_checkpoint(path)


def test_pt_of_overlapping_views_is_bounded_by_the_file_size(tmp_path):
    """Many different views of one stored block: each fits in the storage, together they do not fit in the
    file, so copying them all would cost (views × file size)."""
    G = make_tiny_generator(0)
    state = {k: v.clone() for k, v in G.state_dict().items()}
    block = torch.randn(300_000)
    state.update({f"style.1.extra{i}": block[i : i + 299_000] for i in range(200)})
    path = tmp_path / "views.pt"
    torch.save({"g_ema": state}, path)
    with pytest.raises(CheckpointError, match=r"tensors declare .* more than the file's"):
        read_checkpoint(path)


def test_legacy_pt_declaring_a_huge_storage_is_refused(tmp_path, warm_up_files):
    """The pre-1.6 torch format stores each storage's size in the pickle; torch reserves it (untouched) and
    then finds the data short. Nothing resident grows."""
    legacy = tmp_path / "legacy.pt"
    torch.save({"g_ema": {"style.1.weight": torch.zeros(4)}}, legacy, _use_new_zipfile_serialization=False)
    data = legacy.read_bytes()
    # the storage's arguments: ..., 'cpu' (then a memo byte), 4 elements -> 2**29 elements (2 GiB)
    data, n = re.subn(rb"(cpuq.)K\x04N", lambda m: m[1] + b"\x8a\x04\x00\x00\x00\x20N", data, count=1, flags=re.DOTALL)
    assert n == 1
    legacy.write_bytes(data)
    outcome, grew = load_in_subprocess(legacy, warm_up_files)
    assert outcome.startswith("CheckpointError") and "unreadable" in outcome, outcome
    assert grew < 40 * MB, grew


# ------------------------------------------------------------------------------------------ safetensors


def safetensors_with_metadata(path: Path, meta: dict, tensors: dict | None = None) -> Path:
    save_file(tensors or {}, str(path), metadata={"toonify": json.dumps(meta)})
    return path


def test_tiny_safetensors_declaring_a_huge_architecture_is_refused(tmp_path, warm_up_files):
    channels = {str(r): 65536 for r in default_channels(1024)}
    path = safetensors_with_metadata(
        tmp_path / "huge.safetensors", {"generator": {"resolution": 1024, "channels": channels}}
    )
    assert path.stat().st_size < 400
    outcome, grew = load_in_subprocess(path, warm_up_files)
    assert outcome.startswith("CheckpointError") and "channels at 4 px = 65536" in outcome, outcome
    assert grew < 40 * MB, grew


@pytest.mark.parametrize(
    ("generator", "message"),
    [
        ({"resolution": 4096, "channels": {str(4 * 2**i): 8 for i in range(11)}}, "resolution = 4096"),
        ({"resolution": 256, "w_dim": 100_000}, "w_dim = 100000"),
        ({"resolution": 256, "z_dim": 100_000}, "z_dim = 100000"),
        ({"resolution": 256, "n_mlp": 5000}, "mapping layers = 5000"),
    ],
)
def test_declared_architecture_limits(tmp_path, generator, message):
    path = safetensors_with_metadata(tmp_path / "g.safetensors", {"generator": generator})
    with pytest.raises(CheckpointError, match=message):
        gan.load_generator(path)


def test_sane_architecture_without_its_weights_is_refused_before_building(tmp_path, warm_up_files):
    """config-f at 1024 px is within the limits; the file holds no weights for it, and the mismatch is found
    on the meta device, before the 120 MB network is allocated."""
    path = safetensors_with_metadata(tmp_path / "empty.safetensors", {"generator": {"resolution": 1024}})
    outcome, grew = load_in_subprocess(path, warm_up_files)
    assert outcome.startswith("CheckpointError") and "weights do not fit" in outcome, outcome
    assert grew < 40 * MB, grew


def test_safetensors_header_declaring_a_huge_tensor_is_refused(tmp_path):
    header = json.dumps({"g_ema.style.1.weight": {"dtype": "F32", "shape": [200_000, 200_000], "data_offsets": [0, 4]}})
    header = header.encode() + b" " * (-len(header) % 8)
    path = tmp_path / "header.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        gan.load_generator(path)


def test_real_configs_are_within_the_limits():
    configs = [GeneratorConfig(resolution=r) for r in (256, 512, 1024)]  # config-f
    configs += [GeneratorConfig(resolution=r, channels=default_channels(r, multiplier=1)) for r in (256, 1024)]
    configs += [GeneratorConfig(resolution=MAX_RESOLUTION), GeneratorConfig(resolution=1024, n_mlp=2)]
    for config in configs:
        check_generator_config(config, "real")
    assert max(default_channels(MAX_RESOLUTION).values()) <= MAX_CHANNELS


def test_real_checkpoints_still_load(tmp_path):
    G = make_tiny_generator(1)
    for suffix in (".pt", ".safetensors"):
        G2 = gan.load_generator(save_generator(G, tmp_path / f"g{suffix}"))
        assert G2.config == G.config


# ------------------------------------------------------------------------------------------ NVIDIA pickles


def test_nvidia_pickle_with_an_expanded_tensor_is_refused(tmp_path, warm_up_files):
    net = nv_generator(make_tiny_generator(2))
    b4 = net.state["_modules"]["synthesis"].state["_modules"]["b4"]
    b4.state["_parameters"]["const"] = torch.zeros(1).expand(32, 2**15, 2**14)  # 64 GiB declared
    path = dump({"G": net, "D": None, "G_ema": net}, tmp_path / "expanded.pkl")
    assert path.stat().st_size < 500_000
    outcome, grew = load_in_subprocess(path, warm_up_files)
    assert outcome.startswith("CheckpointError") and "expanded or overlapping" in outcome, outcome
    assert grew < 40 * MB, grew


def test_nvidia_pickle_declaring_a_huge_resolution_is_refused(tmp_path, warm_up_files):
    """A noise-free generator stores no noise buffers, so the loader makes zero noise for every layer: a file
    declaring 4096 px is small, and would make 64 MB-per-layer buffers."""
    G = make_tiny_generator(3)
    net = nv_generator(G)
    synthesis = net.state["_modules"]["synthesis"].state["_modules"]
    for block in list(synthesis.values()):
        for name in ("conv0", "conv1"):
            if name in block.state["_modules"]:
                layer = block.state["_modules"][name].state
                layer["use_noise"] = False
                del layer["_parameters"]["noise_strength"], layer["_buffers"]["noise_const"]
    top = synthesis[f"b{G.config.resolution}"]
    for r in (2**k for k in range(int(np.log2(G.config.resolution)) + 1, 13)):
        synthesis[f"b{r}"] = top  # the same block object again and again: a few bytes per level
    path = dump({"G": net, "D": None, "G_ema": net}, tmp_path / "tall.pkl")
    assert path.stat().st_size < 500_000
    outcome, grew = load_in_subprocess(path, warm_up_files)
    assert outcome.startswith("CheckpointError") and "resolution = 4096" in outcome, outcome
    assert grew < 40 * MB, grew


class _HugeArray:
    """Pickles as numpy's ``_reconstruct`` asked for a 10**10-element array (numpy itself always asks for an
    empty one and fills it from the file's bytes)."""

    def __reduce__(self):
        return np._core.multiarray._reconstruct, (np.ndarray, (10**10,), b"b")


def test_tf_pickle_reconstructing_a_huge_array_is_refused(tmp_path):
    G, D = make_tiny_generator(4), make_tiny_discriminator(4)
    gs = _tf_gs(G, "Gs")
    state = gs.__getstate__()
    state["variables"] = [(name, _HugeArray() if name == "dlatent_avg" else a) for name, a in state["variables"]]
    gs.__getstate__ = lambda: state  # pickle asks the instance for its state
    blob = dump((_tf_gs(G, "G"), _tf_d(D), gs), tmp_path / "tf.pkl")
    with pytest.raises(CheckpointError, match=r"refused: numpy array reconstruction of \(10000000000,\)"):
        read_checkpoint(blob)
