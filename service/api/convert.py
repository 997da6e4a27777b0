"""Protobuf <-> domain conversion for the native API."""

from __future__ import annotations

import math

import numpy as np

from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.errors import InvalidArgument

_FLOAT32 = np.dtype("<f4")


def tensor_to_array(tensor: pb.Tensor, what: str = "input") -> np.ndarray:
    """A float32 array from `data` or `raw`, checked against its shape."""
    shape = list(tensor.shape)
    count = checked_count(shape, what)
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


# Far above any message the server accepts: a guard against shapes whose product overflows.
MAX_ELEMENTS = 1 << 31


def checked_count(shape: list[int], what: str) -> int:
    """The element count of a client-sent shape, refusing shapes no real tensor has."""
    if not shape:
        raise InvalidArgument(f"{what} has no shape: send [T, F]")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{what} shape {shape} has a negative dimension")
    count = math.prod(shape)
    if count > MAX_ELEMENTS or max(shape) > MAX_ELEMENTS:  # [0, 2**62] has no elements and no real shape
        raise InvalidArgument(f"{what} shape {shape} is far larger than any message the server accepts")
    return count


def array_to_tensor(array: np.ndarray) -> pb.Tensor:
    """Responses carry raw little-endian float32 bytes."""
    data = np.ascontiguousarray(array, dtype=_FLOAT32)
    return pb.Tensor(shape=data.shape, raw=data.tobytes())
