"""Protobuf <-> domain conversion for the native API."""

from __future__ import annotations

import numpy as np

from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.errors import InvalidArgument

_FLOAT32 = np.dtype("<f4")


def tensor_to_array(tensor: pb.Tensor, what: str = "input") -> np.ndarray:
    """A float32 array from `data` or `raw`, checked against its shape."""
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{what} shape {shape} has a negative dimension")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 0
    if tensor.raw and tensor.data:
        raise InvalidArgument(f"{what}: fill either data or raw, not both")
    if tensor.raw:
        if len(tensor.raw) != 4 * count:
            raise InvalidArgument(
                f"{what}: raw holds {len(tensor.raw)} bytes, shape {shape} needs {4 * count} (float32)"
            )
        values = np.frombuffer(tensor.raw, dtype=_FLOAT32)
    else:
        if len(tensor.data) != count:
            raise InvalidArgument(f"{what}: data holds {len(tensor.data)} values, shape {shape} needs {count}")
        values = np.asarray(tensor.data, dtype=np.float32)
    return values.reshape(shape)


def array_to_tensor(array: np.ndarray) -> pb.Tensor:
    """Responses carry raw little-endian float32 bytes."""
    data = np.ascontiguousarray(array, dtype=_FLOAT32)
    return pb.Tensor(shape=data.shape, raw=data.tobytes())


def fill_outputs(target: dict[str, pb.Tensor], outputs: dict[str, np.ndarray]) -> None:
    for name, value in outputs.items():
        target[name].CopyFrom(array_to_tensor(value))
