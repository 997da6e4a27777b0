"""The stored session record: bytes with an explicit, versioned header. No pickle, no eval.

    header  <4s H H 32s Q Q Q 16s H H
            magic b"RNNS", format (2), flags, fingerprint (sha256 of the model), epoch, start id, seq,
            input digest of step `seq`, number of state tensors, number of output tensors
    tensor  <H B B  name length, dtype code, ndim; then the UTF-8 name, ndim <I dims, raw little-endian data

`epoch` is drawn at random by the server each time a session starts; with `seq` it makes the
compare-and-set token, so a session restarted under the same id can never be mistaken for its
predecessor at the same seq. `start_id` is the client's name for that start (0: none), which tells a
resent start from a new one. The digest identifies the input of the last applied step, so a resend is a
replay only when it carries the same input.

Flag `ENDED` marks a tombstone: the session ended at `seq`; it keeps the last outputs and no state.
Format 1 records (no start id, digest or flags) still decode, so a rolling upgrade keeps live sessions.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from service.errors import RecordCorrupt

MAGIC = b"RNNS"
FORMAT_VERSION = 2
ENDED = 1
DIGEST_BYTES = 16
NO_DIGEST = bytes(DIGEST_BYTES)
_HEADER = struct.Struct("<4sHH32sQQQ16sHH")
_HEADER_V1 = struct.Struct("<4sHH32sQQHH")
_TENSOR = struct.Struct("<HBB")
_DTYPES: dict[int, np.dtype[np.generic]] = {1: np.dtype("<f4"), 2: np.dtype("<f2")}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}

Tensors = dict[str, np.ndarray]


@dataclass(slots=True)
class SessionRecord:
    """One session after its last applied step (or, `ended`, the tombstone of a finished session). A value:
    never changed once made (not frozen only because one is made per step, and frozen ones cost more)."""

    fingerprint: bytes
    epoch: int
    seq: int
    states: Tensors
    outputs: Tensors
    start_id: int = 0
    digest: bytes = NO_DIGEST
    ended: bool = False
    _token: str = field(default="", init=False, repr=False, compare=False)

    @property
    def token(self) -> str:
        """What the store compares on commit (made once: a step reads it several times)."""
        if not self._token:
            self._token = cas_token(self.epoch, self.seq)
        return self._token


def cas_token(epoch: int, seq: int) -> str:
    return f"{epoch:x}:{seq}"


def encode(record: SessionRecord) -> bytes:
    parts = [
        _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            ENDED if record.ended else 0,
            record.fingerprint,
            record.epoch,
            record.start_id,
            record.seq,
            record.digest,
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


# The header as a numpy record, for many records at once (the same bytes as _HEADER, field by field).
_HEADER_ROWS = np.dtype(
    [
        ("magic", "S4"),
        ("format", "<u2"),
        ("flags", "<u2"),
        ("fingerprint", "S32"),
        ("epoch", "<u8"),
        ("start_id", "<u8"),
        ("seq", "<u8"),
        ("digest", "S16"),
        ("states", "<u2"),
        ("outputs", "<u2"),
    ]
)
assert _HEADER_ROWS.itemsize == _HEADER.size


def encode_rows(
    fingerprint: bytes,
    epochs: Sequence[int],
    start_ids: Sequence[int],
    seqs: Sequence[int],
    digests: Sequence[bytes],
    states: Tensors,
    outputs: Tensors,
    *,
    ended: bool = False,
) -> list[bytes]:
    """The records of B sessions at once, from arrays whose first axis is the session: the same bytes as
    `encode` of each, at a twentieth of the cost (one table of B rows, filled column by column)."""
    count = len(seqs)
    header = np.zeros(count, _HEADER_ROWS)
    header["magic"] = MAGIC
    header["format"] = FORMAT_VERSION
    header["flags"] = ENDED if ended else 0
    header["fingerprint"] = fingerprint
    header["epoch"] = epochs
    header["start_id"] = start_ids
    header["seq"] = seqs
    header["digest"] = digests
    header["states"] = len(states)
    header["outputs"] = len(outputs)
    columns = [header.view(np.uint8).reshape(count, -1)]
    for name, array in (*states.items(), *outputs.items()):
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        dims = data.shape[1:]
        encoded_name = name.encode()
        tensor = _TENSOR.pack(len(encoded_name), _CODES[data.dtype], len(dims)) + encoded_name
        tensor += struct.pack(f"<{len(dims)}I", *dims)
        columns.append(np.broadcast_to(np.frombuffer(tensor, np.uint8), (count, len(tensor))))
        columns.append(data.reshape(count, -1).view(np.uint8))
    table = np.concatenate(columns, axis=1)
    return [row.tobytes() for row in table]


def decode(blob: bytes, *, what: str = "record") -> SessionRecord:
    """Parse a record; anything malformed raises RecordCorrupt (DATA_LOSS), never another error.

    The arrays are read-only views of `blob`: they keep this record's bytes alive, nothing more.
    """
    view = memoryview(blob)
    try:
        magic, version = struct.unpack_from("<4sH", view, 0)
        if magic != MAGIC:
            raise ValueError("bad magic")
        if version == FORMAT_VERSION:
            _, _, flags, fingerprint, epoch, start_id, seq, digest, n_states, n_outputs = _HEADER.unpack_from(view)
            offset = _HEADER.size
        elif version == 1:
            _, _, flags, fingerprint, epoch, seq, n_states, n_outputs = _HEADER_V1.unpack_from(view)
            start_id, digest, flags, offset = 0, NO_DIGEST, 0, _HEADER_V1.size
        else:
            raise ValueError(f"format {version} is not {FORMAT_VERSION}")
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
        start_id=start_id,
        digest=digest,
        ended=bool(flags & ENDED),
    )
