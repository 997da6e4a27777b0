"""Protobuf <-> domain conversion for the native API."""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping

import numpy as np

from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.errors import InvalidArgument

FLOAT32 = np.dtype("<f4")  # the wire's tensors: little-endian float32


def tensor_to_array(tensor: pb.Tensor, what: str = "input", *, scalar_ok: bool = False) -> np.ndarray:
    """A float32 array from `data` or `raw`, checked against its shape. With `scalar_ok`, a tensor with no
    shape is one value (a 0-d array: a model's output may be one value a session); an input needs a shape."""
    raw, dims = tensor.raw, tensor.shape
    if len(dims) == 2 and raw and (rows := dims[0]) > 0 and (columns := dims[1]) > 0 and not tensor.data:
        if len(raw) == 4 * rows * columns:  # the common case, [T, F] in raw bytes, checked at less cost
            return np.frombuffer(raw, dtype=FLOAT32).reshape(rows, columns)
    shape = list(dims)
    count = 1 if scalar_ok and not shape else checked_count(shape, what)
    if tensor.raw and tensor.data:
        raise InvalidArgument(f"{what}: fill either data or raw, not both")
    if tensor.raw:
        if len(tensor.raw) != 4 * count:
            raise InvalidArgument(
                f"{what}: raw holds {len(tensor.raw)} bytes, shape {shape} needs {4 * count} (float32)"
            )
        values = np.frombuffer(tensor.raw, dtype=FLOAT32)
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
    # [0, 2**62] has no elements and no real shape, and numpy refuses [0, 2**31, 2**31] outright: the
    # product of the non-zero dimensions is bounded too.
    if count > MAX_ELEMENTS or math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise InvalidArgument(f"{what} shape {shape} is far larger than any message the server accepts")
    return count


def wire_array(array: np.ndarray) -> np.ndarray:
    """`array` as the wire's raw bytes hold it: C-ordered little-endian float32 (a copy only if it is not)."""
    return array if array.dtype == FLOAT32 and array.flags.c_contiguous else np.ascontiguousarray(array, FLOAT32)


def fill_tensors(tensors: MutableMapping[str, pb.Tensor], arrays: Mapping[str, np.ndarray]) -> None:
    """Each array as a tensor of the message's map, written in place (no message copied). Responses carry
    raw little-endian float32 bytes."""
    for name, array in arrays.items():
        data = wire_array(array)
        tensor = tensors[name]
        tensor.shape.extend(data.shape)
        tensor.raw = data.tobytes()
