"""Model plug-ins (registered in `fedtail.registry.MODELS`) and array (de)serialisation helpers.

Every model is a feature extractor plus a classifier: ``model.features(x)`` gives the embedding,
``model.classifier`` maps it to logits over all classes of the dataset, and ``model(x) ==
model.classifier(model.features(x))``, so decoupled training (cRT), classifier normalisation and
prototype methods work on any model. A model plug-in registers only its feature extractor,
``fn(input_shape, hidden) -> (module, feature_dim)``; `build_model` adds the classifier ``model.classifier``
(``linear`` or ``cosine``). Class-incremental learning keeps one head over all classes: logits of unseen
classes exist but are masked by the methods that need it.
"""

from __future__ import annotations

import functools
import io
import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType
from torch import nn

from fedtail.registry import MODELS

if TYPE_CHECKING:
    from fedtail.config import FedtailConfig


class CosineLinear(nn.Module):
    """Normalised classifier: ``scale * cos(x, w_j)`` (Gidaris & Komodakis 2018; LDAM's ``NormedLinear``,
    Cao et al. 2019, whose initialisation this copies). Logits lie in ``[-scale, scale]``, so no class can
    win by the norm of its weight vector, the bias long-tailed training leaves in a linear head."""

    def __init__(self, in_features: int, out_features: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.weight.data.uniform_(-1, 1).renorm_(2, 0, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * nn.functional.linear(
            nn.functional.normalize(x, dim=1), nn.functional.normalize(self.weight, dim=1)
        )

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, scale={self.scale}"


class FeatureClassifier(nn.Module):
    """``features`` then ``classifier``: the surface every method may rely on."""

    def __init__(self, features: nn.Module, classifier: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_features(
    name: str, input_shape: Sequence[int], hidden: int, depth: int | None = None
) -> tuple[nn.Module, int]:
    """A registered feature extractor and its feature width, from the global RNG (callers seed it)."""
    extra = {} if depth is None else {"depth": depth}  # only the mlp takes a depth (config-checked)
    return MODELS.get(name)(tuple(input_shape), hidden, **extra)


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    hidden: int,
    seed: int,
    classifier: str = "linear",
    cosine_scale: float = 30.0,
    depth: int | None = None,
) -> FeatureClassifier:
    """A registered feature extractor plus a ``linear`` or ``cosine`` classifier, with seeded initial
    weights (the server's round-0 model): the features are initialised first, then the classifier."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features, dim = build_features(name, input_shape, hidden, depth)
        if classifier == "cosine":
            head: nn.Module = CosineLinear(dim, num_classes, cosine_scale)
        elif classifier == "linear":
            head = nn.Linear(dim, num_classes)
        else:
            raise ValueError(f"model.classifier={classifier!r}; allowed: linear, cosine")
        return FeatureClassifier(features, head, dim)


EXTRA_SEED = 0x5E
"""Key of the seed of a semi-supervised method's own modules, so the main model's weights stay the same."""


def model_for(cfg: FedtailConfig, input_shape: Sequence[int]) -> FeatureClassifier:
    """`build_model` with the config's model section (seeded with ``cfg.seed``), plus the semi-supervised
    method's own modules as ``model.extra`` when it has any (`clients.semisup.SemiSupervised.modules`)."""
    m = cfg.model
    model = build_model(
        cfg.model_name(),
        input_shape,
        cfg.num_classes,
        m.hidden,
        cfg.seed,
        m.classifier,
        m.cosine_scale,
        m.depth,
    )
    from fedtail.registry import SEMISUP  # plug-ins import this module

    method = SEMISUP.get(cfg.semisup.method)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 1000 + EXTRA_SEED)
        extra = method.modules(cfg, tuple(input_shape), model.feature_dim)
    if extra:
        model.extra = nn.ModuleDict(extra)
    return model


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


def array_from_numpy(ndarray: np.ndarray) -> Array:
    """``Array(ndarray)`` (the same dtype, shape, stype and bytes), without going through np.save: for a
    C-ordered array of a plain dtype the bytes are the cached ``.npy`` header plus the raw data. Every
    update is encoded once per client call and once more on the server for the mean; np.save's
    per-array set-up cost more than the data of a small model. Anything else takes Flower's path."""
    if ndarray.flags.c_contiguous and _plain(ndarray.dtype):
        shape = tuple(int(n) for n in ndarray.shape)
        try:
            header = _npy_header(np.lib.format.dtype_to_descr(ndarray.dtype), shape)
        except ValueError:  # a header too long for format 1.0: np.save picks another version
            header = b""
        if header:
            return _array(str(ndarray.dtype), shape, header + ndarray.tobytes())
    return Array.from_numpy_ndarray(ndarray)


def _array(dtype: str, shape: tuple[int, ...], data: bytes) -> Array:
    """``Array(dtype=dtype, shape=shape, stype=SType.NUMPY, data=data)``: the same object (tested),
    without the generic constructor's argument dispatch and checks, which cost as much as the data."""
    array = Array.__new__(Array)
    array.__dict__.update(dtype=dtype, shape=shape, stype=SType.NUMPY, data=data)
    return array


def to_arrays(model: nn.Module) -> ArrayRecord:
    """The model's state dict as an ArrayRecord (what ``ArrayRecord(state_dict)`` gives)."""
    record = ArrayRecord()
    for key, value in model.state_dict().items():
        record[key] = array_from_numpy(value.detach().cpu().numpy())
    return record


def to_state_dict(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """``arrays.to_torch_state_dict()`` (equal tensors), decoding with `array_to_numpy`."""
    return {key: torch.from_numpy(array_to_numpy(a).copy()) for key, a in arrays.items()}


def reinit_classifier(arrays: ArrayRecord, fresh: FeatureClassifier, classes: Sequence[int]) -> ArrayRecord:
    """``arrays`` with the classifier's rows (weight rows, bias entries) of ``classes`` replaced by those of
    the freshly initialised ``fresh``: cRT's re-initialisation (Kang et al. 2020) of the classes it
    re-trains, leaving the features and every other class's row as they are."""
    rows = torch.as_tensor(list(classes), dtype=torch.int64)
    new = fresh.state_dict()
    out = ArrayRecord()
    for key, array in arrays.items():
        if key.startswith("classifier."):
            value = torch.from_numpy(array_to_numpy(array).copy())
            value[rows] = new[key][rows].to(value.dtype)
            array = array_from_numpy(value.numpy())
        out[key] = array
    return out


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> nn.Module:
    """``model.load_state_dict(arrays, strict=True)``. When every key, shape and dtype matches a CPU
    tensor of the model, the data is copied straight into it (the same values load_state_dict would
    copy); anything else (another device, a cast, a missing key) goes through load_state_dict and its
    errors."""
    target = model.state_dict()
    decoded = {key: array_to_numpy(a) for key, a in arrays.items()}
    if target.keys() == decoded.keys() and not _has_load_hooks(model):
        pairs = [(target[k].numpy(), v) for k, v in decoded.items() if _same_cpu_layout(target[k], v)]
        if len(pairs) == len(decoded):
            for dst, src in pairs:
                np.copyto(dst, src, casting="no")
            return model
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in decoded.items()}, strict=True)
    return model


def _same_cpu_layout(tensor: torch.Tensor, array: np.ndarray) -> bool:
    return (
        tensor.device.type == "cpu"
        and tensor.shape == array.shape
        and tensor.dtype == _TORCH_OF.get(array.dtype)
        and not tensor.requires_grad
    )


_TORCH_OF = {
    np.dtype(n): getattr(torch, n)
    for n in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
}


def _has_load_hooks(model: nn.Module) -> bool:
    """Whether any submodule customises loading (state-dict load hooks or its own
    ``_load_from_state_dict``, beyond torch's own layers): then only load_state_dict is right."""
    for m in model.modules():
        if m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks:
            return True
        own = type(m)._load_from_state_dict
        if own is not nn.Module._load_from_state_dict and not type(m).__module__.startswith("torch.nn."):
            return True
    return False


def on_device(model: nn.Module, device: torch.device) -> bool:
    """Whether every parameter and buffer already lives on ``device`` (``model.to`` walks every module
    even when nothing moves: a tenth of a small client's call)."""
    return all(t.device == device for t in itertools.chain(model.parameters(), model.buffers()))


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; code stays device-agnostic."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("engine.device='cuda' but no CUDA device is available; allowed here: auto, cpu")
    return torch.device(name)
