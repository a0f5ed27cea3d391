"""Model plug-ins (registered in `fedtail.registry.MODELS`) and array (de)serialisation helpers.

A model builder takes ``(input_shape, num_classes, hidden)`` and returns an ``nn.Module`` whose forward
gives logits over all classes of the dataset (class-incremental learning keeps one growing head view:
logits of unseen classes exist but are masked by the methods that need it).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType
from torch import nn

from fedtail.registry import MODELS


def build_model(name: str, input_shape: Sequence[int], num_classes: int, hidden: int, seed: int) -> nn.Module:
    """Build a registered model with seeded initial weights (the server's round-0 model)."""
    builder = MODELS.get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(tuple(input_shape), num_classes, hidden)


# ---- Flower Array -> numpy, exactly as Flower's Array.numpy ----------------------------------------
# Every update is decoded at least twice (client: the global model; server: the check and the mean);
# Flower goes through np.load, whose ``ast.literal_eval`` of the header costs more than the data for
# small models.
_NPY_V1 = b"\x93NUMPY\x01\x00"


@functools.lru_cache(maxsize=1024)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` v1.0 header np.save writes for a C-ordered array of this dtype and shape."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _plain(dtype: np.dtype) -> bool:
    return dtype.fields is None and not dtype.hasobject and dtype.subdtype is None


def array_to_numpy(array: Array) -> np.ndarray:
    """``array.numpy()`` (equal dtype, shape and bytes; read-only), reading the data in place when its
    header is exactly the one np.save writes for the Array's own dtype and shape in C order; anything
    else takes Flower's path."""
    data = array.data
    if array.stype == SType.NUMPY and data[:8] == _NPY_V1:
        try:
            dtype = np.dtype(array.dtype)
            shape = tuple(int(n) for n in array.shape)
            header = _npy_header(np.lib.format.dtype_to_descr(dtype), shape) if _plain(dtype) else b""
        except (TypeError, ValueError):
            header = b""
        count = math.prod(shape) if header else 0
        if header and data.startswith(header) and len(data) == len(header) + count * dtype.itemsize:
            return np.frombuffer(data, dtype, count=count, offset=len(header)).reshape(shape)
    return array.numpy()


def to_arrays(model: nn.Module) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> nn.Module:
    state = {k: torch.from_numpy(array_to_numpy(a).copy()) for k, a in arrays.items()}
    model.load_state_dict(state, strict=True)
    return model


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; code stays device-agnostic."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("engine.device='cuda' but no CUDA device is available; allowed here: auto, cpu")
    return torch.device(name)
