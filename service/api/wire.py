"""Protobuf's wire format, written by hand where building the messages costs more than the work they carry.

A `StepBatchResult` of 256 answers built as protobuf objects (five fields and an outputs map a step, then
serialised) cost the event loop about 2.4 us a step, measured alone; written here, its bytes cost 0.5. The
bytes are what protobuf would write: the same fields in field-number order, proto3 defaults left out, so
any protobuf parser reads the same message (tests parse both and compare). Only the common answer, a step's
result, is written here; the rest (errors) go through protobuf and are embedded as they serialise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from service.api.convert import wire_array

if TYPE_CHECKING:  # the load generator imports this module, and needs nothing of the engine's
    from service.sessions import StepResult

_SMALL = 1 << 14
_VARINTS: list[bytes] = []  # varint(i) for i < _SMALL: most lengths, seqs and versions


def _encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64s as protobuf writes them: ten bytes, two's complement
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_VARINTS.extend(_encode_varint(i) for i in range(_SMALL))


def varint(value: int) -> bytes:
    """`value` as a protobuf varint."""
    return _VARINTS[value] if 0 <= value < _SMALL else _encode_varint(value)


def _head(number: int, length: int) -> bytes:
    """A length-delimited field's tag and length, its value to follow."""
    return varint(number << 3 | 2) + varint(length)


def field(number: int, value: bytes) -> bytes:
    """A length-delimited field (a string, bytes, a message or a packed repeated field): tag, length, value."""
    return _head(number, len(value)) + value


def _varint_field(number: int, value: int) -> bytes:
    """A varint field (an integer), left out at its default (0), as proto3 does."""
    return varint(number << 3) + varint(value) if value else b""


# StepResponse's fields (rnnserve.v1): session_id 1, seq 2, model 3, version 4, outputs 5 (a map: entries of
# key 1, value 2), replayed 6. Tensor's: shape 1 (packed), raw 3. StepBatchResult's: responses 1, id 2.
_SEQ_TAG = varint(2 << 3)
_REPLAYED = varint(6 << 3) + varint(1)


class BatchResultWriter:
    """Serialised `StepBatchResult`s. What repeats from step to step is written once and kept: each model
    version's fields, and each output's field head (its map entry's name, the tensor's shape and the raw
    field's tag and length; a raw float32 tensor's length follows from its shape)."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, int], bytes] = {}
        self._heads: dict[tuple[str, tuple[int, ...]], bytes] = {}

    def result(self, answer: StepResult) -> bytes:
        """The responses field (1) of a StepBatchResult for a step's result."""
        sid = answer.session_id.encode()
        parts = [field(1, sid) if sid else b"", _SEQ_TAG + varint(answer.seq) if answer.seq else b""]
        version = (answer.model, answer.version)
        model = self._models.get(version)
        if model is None:
            encoded = answer.model.encode()
            model = self._models[version] = (field(3, encoded) if encoded else b"") + _varint_field(4, answer.version)
        parts.append(model)
        for name, array in answer.outputs.items():
            data = wire_array(array)
            output = (name, data.shape)
            head = self._heads.get(output)
            if head is None:
                head = self._heads[output] = _output_head(*output)
            parts.append(head)
            parts.append(data.tobytes())
        if answer.replayed:
            parts.append(_REPLAYED)
        return field(1, b"".join(parts))

    @staticmethod
    def embedded(response: bytes) -> bytes:
        """The responses field (1) of a StepBatchResult for a response serialised by protobuf."""
        return field(1, response)

    @staticmethod
    def batch(responses: list[bytes], batch_id: int) -> bytes:
        """A StepBatchResult of `responses` (each as `result` or `embedded` write it)."""
        responses.append(_varint_field(2, batch_id))
        return b"".join(responses)


def _output_head(name: str, shape: tuple[int, ...]) -> bytes:
    """An outputs map entry's bytes up to the tensor's raw bytes, for a float32 tensor of `shape`."""
    size = 4 * int(np.prod(shape, dtype=np.int64))
    dims = b"".join(varint(d) for d in shape)
    tensor = (field(1, dims) if dims else b"") + (_head(3, size) if size else b"")
    tensor_length = len(tensor) + size
    key = field(1, name.encode())  # a map entry's key and value are written even when empty, as protobuf does
    value = _head(2, tensor_length) + tensor
    return _head(5, len(key) + len(value) + size) + key + value
