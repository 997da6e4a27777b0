"""The stored session record: bytes with an explicit, versioned header. No pickle, no eval.

    header  <4s H H 32s Q Q H H   magic b"RNNS", format, flags, fingerprint (sha256), epoch, seq,
                                  number of state tensors, number of output tensors
    tensor  <H B B  name length, dtype code, ndim; then the UTF-8 name, ndim <I dims, raw little-endian data

`epoch` is drawn at random when a session starts; with `seq` it makes the compare-and-set token, so a
session restarted under the same id can never be mistaken for its predecessor at the same seq.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from service.errors import RecordCorrupt

MAGIC = b"RNNS"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHH32sQQHH")
_TENSOR = struct.Struct("<HBB")
_DTYPES: dict[int, np.dtype[np.generic]] = {1: np.dtype("<f4"), 2: np.dtype("<f2")}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One session's state after its last applied step."""

    fingerprint: bytes
    epoch: int
    seq: int
    states: Tensors
    outputs: Tensors

    @property
    def token(self) -> str:
        """What the store compares on commit."""
        return cas_token(self.epoch, self.seq)


def cas_token(epoch: int, seq: int) -> str:
    return f"{epoch:x}:{seq}"


def encode(record: SessionRecord) -> bytes:
    parts = [
        _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            0,
            record.fingerprint,
            record.epoch,
            record.seq,
            len(record.states),
            len(record.outputs),
        )
    ]
    for name, array in (*record.states.items(), *record.outputs.items()):
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        encoded_name = name.encode()
        parts.append(_TENSOR.pack(len(encoded_name), _CODES[data.dtype], data.ndim))
        parts.append(encoded_name)
        parts.append(struct.pack(f"<{data.ndim}I", *data.shape))
        parts.append(data.tobytes())
    return b"".join(parts)


def decode(blob: bytes, *, what: str = "record") -> SessionRecord:
    """Parse a record; anything malformed raises RecordCorrupt (DATA_LOSS), never another error."""
    view = memoryview(blob)
    try:
        magic, version, _flags, fingerprint, epoch, seq, n_states, n_outputs = _HEADER.unpack_from(view, 0)
        if magic != MAGIC:
            raise ValueError("bad magic")
        if version != FORMAT_VERSION:
            raise ValueError(f"format {version} is not {FORMAT_VERSION}")
        offset = _HEADER.size
        tensors: list[tuple[str, np.ndarray]] = []
        for _ in range(n_states + n_outputs):
            name_len, code, ndim = _TENSOR.unpack_from(view, offset)
            offset += _TENSOR.size
            name = bytes(view[offset : offset + name_len]).decode()
            offset += name_len
            dims = struct.unpack_from(f"<{ndim}I", view, offset)
            offset += 4 * ndim
            dtype = _DTYPES[code]
            count = int(np.prod(dims, dtype=np.int64))
            end = offset + count * dtype.itemsize
            if end > len(view):
                raise ValueError("truncated tensor data")
            tensors.append((name, np.frombuffer(view[offset:end], dtype=dtype).reshape(dims)))
            offset = end
        if offset != len(view):
            raise ValueError(f"{len(view) - offset} trailing bytes")
    except (struct.error, ValueError, KeyError, UnicodeDecodeError) as err:
        raise RecordCorrupt(f"stored {what} does not parse ({err}); start the session again") from err
    return SessionRecord(
        fingerprint=fingerprint,
        epoch=epoch,
        seq=seq,
        states=dict(tensors[:n_states]),
        outputs=dict(tensors[n_states:]),
    )
