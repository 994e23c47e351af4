"""An allow-listing unpickler for NVIDIA StyleGAN2 pickles (PyTorch and TensorFlow).

NVIDIA's own loader executes the ``module_src`` embedded in every PyTorch pickle; any pickle can also name
``os.system`` or similar as a global. Here ``find_class`` returns only harmless stand-ins and data rebuild
functions; every other global raises :class:`UnsafePickleError` before anything is called.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
from typing import Any

import numpy as np
import torch


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list."""


class PersistentObject:
    """Stand-in for an NVIDIA ``persistent_class`` instance: keeps the class name and pickled state only.

    The embedded ``module_src`` is dropped unread: it is never executed."""

    def __init__(self, meta: dict) -> None:
        self.class_name: str = str(meta.get("class_name", ""))
        self.state: Any = meta.get("state")

    def __repr__(self) -> str:
        return f"PersistentObject({self.class_name})"


def _reconstruct_persistent_obj(meta: dict) -> PersistentObject:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UnsafePickleError("unexpected persistent object metadata")
    return PersistentObject(meta)


class TFNetworkStub(dict):
    """Stand-in for ``dnnlib.tflib.network.Network``: its pickled state is a plain dict."""

    def __setstate__(self, state: dict) -> None:
        self.update(state)


class EasyDict(dict):
    def __setstate__(self, state: dict) -> None:
        self.update(state)


def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any, *rest: Any) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2``, refusing a tensor larger than its storage: a stride-0 view
    declares gigabytes over a few stored bytes, and the first copy (``.contiguous()``) would allocate them."""
    t = torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, *rest)
    if t.numel() * t.element_size() > t.untyped_storage().nbytes():
        raise UnsafePickleError(
            f"a tensor of shape {list(t.shape)} declares {t.numel() * t.element_size()} bytes over a storage of "
            f"{t.untyped_storage().nbytes()} (an expanded or overlapping tensor)"
        )
    return t


def _reconstruct_array(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """``numpy``'s ``_reconstruct`` as numpy's own pickles call it: an empty ndarray that ``__setstate__``
    then fills from bytes in the file. Any other shape would allocate memory the file never backs."""
    if subtype is not np.ndarray or tuple(shape) != (0,):
        raise UnsafePickleError(f"numpy array reconstruction of {shape!r} is not how numpy pickles arrays")
    return np._core.multiarray._reconstruct(np.ndarray, (0,), dtype)


def _encode_latin1(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` only as pickle protocol 2 uses it to store a bytes object: its latin-1 text back to
    bytes. Other encodings (codecs such as zlib or rot13 run arbitrary transforms) are refused."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode is allowed only on text with 'latin1', not {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as pickle protocol 2 stores an empty bytes object; ``bytes(n)`` would allocate n bytes."""
    if args:
        raise UnsafePickleError("bytes() with arguments is not allowed in a checkpoint")
    return b""


def _load_torch_bytes(b: bytes) -> Any:
    # Nested storages inside NVIDIA pickles are torch.save blobs: load them with weights_only as well.
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.tflib.network", "Network"): TFNetworkStub,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("dnnlib", "EasyDict"): EasyDict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _encode_latin1,  # pickle protocol 2: bytes objects
    ("builtins", "bytes"): _empty_bytes,  # pickle protocol 2: empty bytes objects
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_torch_bytes,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_array,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_array,
    ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 pickles name Python 2 modules ('__builtin__.set'); map them as pickle's own
        # find_class does, then look the Python 3 name up in the allow-list.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"global '{module}.{name}' is not allowed in a checkpoint") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("persistent ids are not allowed in a checkpoint pickle")


def safe_load(f: io.BufferedIOBase) -> Any:
    """Unpickle ``f`` allowing only the globals StyleGAN2 checkpoints need."""
    return AllowListUnpickler(f).load()
