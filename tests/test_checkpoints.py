import argparse
import os
import pickle
from pathlib import Path

import pytest
import torch

from gan import CheckpointError, load_discriminator, load_generator, save_generator
from gan.checkpoints import detect_format, read_checkpoint
from gan.checkpoints.native import native_metadata
from gan.cli import main as cli_main
from tests.conftest import make_tiny_generator


def render(G, seed: int = 0) -> torch.Tensor:
    ws = torch.randn(2, G.num_ws, G.w_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return G.synthesis(ws, noise_mode="const")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_and_reload_gives_identical_images(tmp_path, tiny_g, tiny_d, suffix):
    path = save_generator(tiny_g, tmp_path / f"g{suffix}", meta={"name": "tiny"}, D=tiny_d)
    G = load_generator(path)
    assert torch.equal(render(G), render(tiny_g))
    assert torch.equal(G.w_avg, tiny_g.w_avg)
    assert G.meta["name"] == "tiny"
    assert G.config == tiny_g.config
    D = load_discriminator(path)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(D(x), tiny_d(x))


def test_native_metadata_records_architecture_and_hash(tmp_path, tiny_g):
    path = save_generator(tiny_g, tmp_path / "g.safetensors", meta={"ancestors": ["abc"]})
    meta = native_metadata(path)
    assert meta["generator"]["resolution"] == 32
    assert meta["ancestors"] == ["abc"]
    assert len(meta["content_hash"]) == 64
    other = make_tiny_generator(seed=1)
    other_path = save_generator(other, tmp_path / "h.safetensors")
    assert native_metadata(other_path)["content_hash"] != meta["content_hash"]
    # the hash does not depend on the container: the .pt copy of the same weights hashes the same
    assert load_generator(save_generator(tiny_g, tmp_path / "g.pt")).meta["content_hash"] == meta["content_hash"]


def test_rosinality_variants_load(tmp_path, tiny_g, tiny_d):
    sd = tiny_g.state_dict()
    ref = render(tiny_g)
    variants = {
        "bare.pt": sd,
        "converted.pt": {"g_ema": sd, "latent_avg": tiny_g.w_avg.clone()},
        "jojo.pt": {"g": sd},
        "psp.pt": {"state_dict": {f"decoder.{k}": v for k, v in sd.items()}, "latent_avg": tiny_g.w_avg.clone()},
        "train.pt": {
            "g": sd,
            "d": tiny_d.state_dict(),
            "g_ema": sd,
            "g_optim": torch.optim.Adam(tiny_g.parameters()).state_dict(),
            "d_optim": torch.optim.Adam(tiny_d.parameters()).state_dict(),
            "args": argparse.Namespace(size=32, n_mlp=2, channel_multiplier=1, path="lmdb", r1=10.0),
            "ada_aug_p": 0.1,
        },
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        assert detect_format(tmp_path / name) == "rosinality"
        G = load_generator(tmp_path / name)
        assert torch.equal(render(G), ref), name
    # without a stored average latent it is estimated from samples
    bare = load_generator(tmp_path / "bare.pt")
    assert (bare.w_avg - tiny_g.w_avg).norm() < 0.2 * tiny_g.w_avg.norm()
    assert load_discriminator(tmp_path / "train.pt").state_dict().keys() == tiny_d.state_dict().keys()
    with pytest.raises(CheckpointError, match="no usable discriminator"):
        load_discriminator(tmp_path / "bare.pt")


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_torch_file_is_refused_without_running(tmp_path, tiny_g):
    marker = tmp_path / "pwned"
    torch.save({"g_ema": tiny_g.state_dict(), "args": _Exploit(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not allowed"):
        load_generator(tmp_path / "evil.pt")
    assert not marker.exists()


def test_malicious_plain_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"G_ema": _Exploit(marker)}, protocol=4))
    with pytest.raises(CheckpointError):
        load_generator(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_broken_files_give_clear_errors(tmp_path, tiny_g):
    good = save_generator(tiny_g, tmp_path / "g.safetensors")
    pt = save_generator(tiny_g, tmp_path / "g.pt")
    cases = {
        "empty.pt": b"",
        "text.safetensors": b"hello, this is not a model at all",
        "cut.safetensors": good.read_bytes()[: good.stat().st_size // 2],
        "cut.pt": pt.read_bytes()[: pt.stat().st_size // 2],
        "image.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError):
            load_generator(tmp_path / name)
    with pytest.raises(CheckpointError):
        load_generator(tmp_path / "missing.pt")
    torch.save({"something": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no StyleGAN2 generator"):
        load_generator(tmp_path / "other.pt")


def test_tampered_native_weights_fail_the_hash_check(tmp_path, tiny_g):
    path = save_generator(tiny_g, tmp_path / "g.safetensors")
    blob = bytearray(path.read_bytes())
    blob[len(blob) - 200] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="content hash"):
        load_generator(path)


def test_cli_convert_info_generate(tmp_path, tiny_g, capsys):
    src = save_generator(tiny_g, tmp_path / "g.safetensors")
    assert cli_main(["convert", str(src), str(tmp_path / "g.pt")]) == 0
    assert cli_main(["convert", str(tmp_path / "g.pt"), str(tmp_path / "back.safetensors")]) == 0
    back = load_generator(tmp_path / "back.safetensors")
    assert torch.equal(render(back), render(tiny_g))
    assert back.meta["converted_from"]["format"] == "rosinality"
    assert cli_main(["info", str(tmp_path / "g.pt")]) == 0
    assert '"resolution": 32' in capsys.readouterr().out
    out = tmp_path / "grid.png"
    assert cli_main(["generate", str(src), "--seeds", "0-3", "--truncation", "0.7", "--out", str(out)]) == 0
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)
    assert cli_main(["info", str(tmp_path / "nope.pt")]) == 2


def test_read_checkpoint_reports_source_format(tmp_path, tiny_g):
    assert read_checkpoint(save_generator(tiny_g, tmp_path / "a.pt")).source_format == "rosinality"
    assert read_checkpoint(save_generator(tiny_g, tmp_path / "a.safetensors")).source_format == "native"
