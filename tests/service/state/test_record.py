"""The state record codec: exact round trips; anything malformed is DATA_LOSS, never another error."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from service.errors import Code, RecordCorrupt
from service.state.record import SessionRecord, decode, encode


def sample() -> SessionRecord:
    rng = np.random.default_rng(0)
    return SessionRecord(
        fingerprint=bytes(range(32)),
        epoch=(1 << 62) + 5,
        seq=123456789012,
        states={
            "h0": rng.standard_normal(8).astype(np.float32),
            "c0": rng.standard_normal(8).astype(np.float32),
        },
        outputs={"logits": rng.standard_normal((3, 5)).astype(np.float32)},
    )


def test_round_trip_is_exact():
    record = sample()
    back = decode(encode(record))
    assert (back.fingerprint, back.epoch, back.seq) == (record.fingerprint, record.epoch, record.seq)
    assert list(back.states) == ["h0", "c0"] and list(back.outputs) == ["logits"]
    for name in record.states:
        np.testing.assert_array_equal(back.states[name], record.states[name])
    np.testing.assert_array_equal(back.outputs["logits"], record.outputs["logits"])
    assert back.token == record.token == f"{record.epoch:x}:{record.seq}"


def test_header_is_explicit():
    blob = encode(sample())
    assert blob[:4] == b"RNNS"
    assert struct.unpack_from("<H", blob, 4) == (1,)
    assert blob[8:40] == bytes(range(32))


def test_fp16_states_round_trip():
    record = sample()
    half = SessionRecord(record.fingerprint, 1, 1, {"h0": record.states["h0"].astype(np.float16)}, {})
    np.testing.assert_array_equal(decode(encode(half)).states["h0"], half.states["h0"])


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b"",
        lambda b: b"XXXX" + b[4:],
        lambda b: b[:4] + b"\x09\x00" + b[6:],  # unknown format version
        lambda b: b[:-1],  # truncated data
        lambda b: b + b"\0",  # trailing bytes
        lambda b: b[:63],  # truncated inside the first tensor header (the header is 60 bytes)
        lambda b: b[:62] + b"\x07" + b[63:],  # unknown dtype code in the first tensor
    ],
)
def test_malformed_records_are_data_loss(mangle):
    with pytest.raises(RecordCorrupt) as info:
        decode(mangle(encode(sample())))
    assert info.value.code is Code.DATA_LOSS
    assert "start the session again" in info.value.message
