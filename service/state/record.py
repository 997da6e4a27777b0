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
from dataclasses import dataclass

import numpy as np

from service.errors import RecordCorrupt

MAGIC = b"RNNS"
FORMAT_VERSION = 2
ENDED = 1
DIGEST_BYTES = 16
NO_DIGEST = bytes(DIGEST_BYTES)
_HEADER = struct.Struct("<4sHH32sQQQ16sHH")
_HEADER_V1 = struct.Struct("<4sHH32sQQHH")
# The header's bytes that differ from record to record of one model: epoch, start id, seq, digest.
_PER_RECORD = slice(struct.calcsize("<4sHH32s"), _HEADER.size - struct.calcsize("<HH"))
_TENSOR = struct.Struct("<HBB")
_DTYPES: dict[int, np.dtype[np.generic]] = {1: np.dtype("<f4"), 2: np.dtype("<f2")}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}

Tensors = dict[str, np.ndarray]


class SessionRecord:
    """One session after its last applied step (or, `ended`, the tombstone of a finished session). A value:
    never changed once made.

    Its arrays are given, or read from `blob`, its encoding, when first asked for: a record a batch makes
    carries its bytes (what the store is sent), and most such records are never read back as arrays (the
    next step's batch reads their states from the bytes of all its records at once, `stack_states`)."""

    __slots__ = ("fingerprint", "epoch", "seq", "start_id", "digest", "ended", "blob", "_states", "_outputs", "_token")

    def __init__(
        self,
        fingerprint: bytes,
        epoch: int,
        seq: int,
        states: Tensors | None = None,
        outputs: Tensors | None = None,
        start_id: int = 0,
        digest: bytes = NO_DIGEST,
        ended: bool = False,
        *,
        blob: bytes | None = None,
    ) -> None:
        if blob is None and (states is None or outputs is None):
            raise ValueError("a record needs its arrays or its encoding")
        self.fingerprint = fingerprint
        self.epoch = epoch
        self.seq = seq
        self.start_id = start_id
        self.digest = digest
        self.ended = ended
        self.blob = blob  # this record's encoding, where known (`encode` of it gives the same bytes)
        self._states = states
        self._outputs = outputs
        self._token = ""

    @property
    def states(self) -> Tensors:
        if self._states is None:
            self._read_blob()
        assert self._states is not None
        return self._states

    @property
    def outputs(self) -> Tensors:
        if self._outputs is None:
            self._read_blob()
        assert self._outputs is not None
        return self._outputs

    def encoded(self) -> bytes:
        """This record's bytes, as stored."""
        return self.blob if self.blob is not None else encode(self)

    def _read_blob(self) -> None:
        assert self.blob is not None
        read = decode(self.blob)
        self._states, self._outputs = read.states, read.outputs

    @property
    def token(self) -> str:
        """What the store compares on commit (made once: a step reads it several times)."""
        if not self._token:
            self._token = cas_token(self.epoch, self.seq)
        return self._token

    def __repr__(self) -> str:
        ended = ", ended" if self.ended else ""
        return f"SessionRecord({self.fingerprint.hex()[:12]}, epoch={self.epoch:x}, seq={self.seq}{ended})"


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
        blob=blob if isinstance(blob, bytes) else None,
    )


@dataclass(frozen=True)
class StateLayout:
    """Where a model's state tensors lie in the bytes of its live records (the states come right after the
    header, the outputs after them): what `stack_states` reads."""

    end: int  # where the last state tensor's data ends
    fixed: np.ndarray  # the byte offsets (below `end`) that every live record of the model holds alike ...
    expected: np.ndarray  # ... and their bytes
    tensors: tuple[tuple[str, int, int, np.dtype[np.generic], tuple[int, ...]], ...]  # name, start, stop, dtype, shape
    fresh: bytes  # a record of a fresh session's state (its outputs empty)


def state_layout(fingerprint: bytes, zero_states: Tensors, outputs: int) -> StateLayout:
    """The layout of the records `encode` (and `encode_rows`) write for a model whose one-session state is
    `zero_states` (in the model's order) and which has `outputs` output tensors."""
    fresh = encode(SessionRecord(fingerprint, 0, 0, zero_states, {}))
    header = bytearray(fresh[: _HEADER.size])
    struct.pack_into("<H", header, _HEADER.size - 2, outputs)  # the count every live record has
    fresh = bytes(header) + fresh[_HEADER.size :]
    variable = np.zeros(len(fresh), dtype=bool)
    variable[_PER_RECORD] = True  # epoch, start id, seq, digest
    tensors = []
    offset = _HEADER.size
    for name, array in zero_states.items():
        offset += _TENSOR.size + len(name.encode()) + 4 * array.ndim
        stop = offset + array.nbytes
        variable[offset:stop] = True
        tensors.append((name, offset, stop, array.dtype.newbyteorder("<"), array.shape))
        offset = stop
    fixed = np.flatnonzero(~variable[:offset])
    expected = np.frombuffer(fresh, np.uint8)[fixed]
    return StateLayout(offset, fixed, expected, tuple(tensors), fresh)


def stack_states(layout: StateLayout, blobs: Sequence[bytes]) -> Tensors | None:
    """The state tensors of B records [B, ...], read from their bytes at once: the same arrays as stacking
    each record's `states`, without a step per record. None if any is not laid out as `layout` says (a
    tombstone, an older format, another model): stack their `states` then."""
    end = layout.end
    lengths = set(map(len, blobs))
    if min(lengths) < end:
        return None
    if len(lengths) == 1:  # every record the same size (their last steps had as many time steps)
        table = np.frombuffer(b"".join(blobs), np.uint8).reshape(len(blobs), -1)
    else:
        table = np.frombuffer(b"".join([memoryview(blob)[:end] for blob in blobs]), np.uint8).reshape(len(blobs), end)
    if not (table[:, layout.fixed] == layout.expected).all():
        return None
    count = len(blobs)
    return {
        name: table[:, start:stop].copy().view(dtype).reshape(count, *shape)
        for name, start, stop, dtype, shape in layout.tensors
    }
