"""The state record codec: exact round trips; anything malformed is DATA_LOSS, never another error."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from service.errors import Code, RecordCorrupt
from service.state.record import NO_DIGEST, SessionRecord, decode, encode


def sample(**changes: object) -> SessionRecord:
    rng = np.random.default_rng(0)
    fields: dict[str, object] = dict(
        fingerprint=bytes(range(32)),
        epoch=(1 << 62) + 5,
        seq=123456789012,
        states={
            "h0": rng.standard_normal(8).astype(np.float32),
            "c0": rng.standard_normal(8).astype(np.float32),
        },
        outputs={"logits": rng.standard_normal((3, 5)).astype(np.float32)},
        start_id=(1 << 64) - 1,
        digest=bytes(range(100, 116)),
    )
    return SessionRecord(**(fields | changes))  # type: ignore[arg-type]


def test_round_trip_is_exact():
    record = sample()
    back = decode(encode(record))
    assert (back.fingerprint, back.epoch, back.seq) == (record.fingerprint, record.epoch, record.seq)
    assert (back.start_id, back.digest, back.ended) == (record.start_id, record.digest, False)
    assert list(back.states) == ["h0", "c0"] and list(back.outputs) == ["logits"]
    for name in record.states:
        np.testing.assert_array_equal(back.states[name], record.states[name])
    np.testing.assert_array_equal(back.outputs["logits"], record.outputs["logits"])
    assert back.token == record.token == f"{record.epoch:x}:{record.seq}"


def test_a_tombstone_keeps_its_outputs_and_no_state():
    tombstone = sample(states={}, ended=True)
    back = decode(encode(tombstone))
    assert back.ended and back.states == {} and back.seq == tombstone.seq
    np.testing.assert_array_equal(back.outputs["logits"], tombstone.outputs["logits"])


def test_header_is_explicit():
    blob = encode(sample())
    assert blob[:4] == b"RNNS"
    assert struct.unpack_from("<HH", blob, 4) == (2, 0)
    assert blob[8:40] == bytes(range(32))
    assert struct.unpack_from("<H", encode(sample(ended=True, states={})), 6) == (1,)


def test_format_1_records_still_decode():
    """Written by the previous release: a rolling upgrade must not turn live sessions into DATA_LOSS."""
    record = sample()
    header = struct.pack("<4sHH32sQQHH", b"RNNS", 1, 0, record.fingerprint, record.epoch, record.seq, 2, 1)
    body = encode(record)[struct.calcsize("<4sHH32sQQQ16sHH") :]
    back = decode(header + body)
    assert (back.seq, back.epoch, back.start_id, back.digest, back.ended) == (
        record.seq,
        record.epoch,
        0,
        NO_DIGEST,
        False,
    )
    np.testing.assert_array_equal(back.states["c0"], record.states["c0"])


def test_fp16_states_round_trip():
    record = sample()
    half = SessionRecord(record.fingerprint, 1, 1, {"h0": record.states["h0"].astype(np.float16)}, {})
    np.testing.assert_array_equal(decode(encode(half)).states["h0"], half.states["h0"])


HEADER = struct.calcsize("<4sHH32sQQQ16sHH")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b"",
        lambda b: b"XXXX" + b[4:],
        lambda b: b[:4] + b"\x09\x00" + b[6:],  # unknown format version
        lambda b: b[:-1],  # truncated data
        lambda b: b + b"\0",  # trailing bytes
        lambda b: b[: HEADER + 3],  # truncated inside the first tensor header
        lambda b: b[: HEADER + 2] + b"\x07" + b[HEADER + 3 :],  # unknown dtype code in the first tensor
        lambda b: b[: HEADER - 1],  # truncated header
    ],
)
def test_malformed_records_are_data_loss(mangle):
    with pytest.raises(RecordCorrupt) as info:
        decode(mangle(encode(sample())))
    assert info.value.code is Code.DATA_LOSS
    assert "start the session again" in info.value.message


@pytest.mark.parametrize("ended", [False, True])
def test_records_encoded_together_equal_records_encoded_one_by_one(ended):
    from service.state.record import encode_rows

    rng = np.random.default_rng(1)
    states = {} if ended else {"h0": rng.random((5, 8), np.float32), "c0": rng.random((5, 2, 3)).astype(np.float16)}
    outputs = {"logits": rng.random((5, 3, 4), np.float32)}
    epochs, start_ids, seqs = [1, 2, 3, 1 << 63, 5], [0, 7, 0, (1 << 64) - 1, 9], [1, 2, 3, 4, 1 << 40]
    digests = [bytes([i]) * 16 for i in range(5)]
    blobs = encode_rows(b"F" * 32, epochs, start_ids, seqs, digests, states, outputs, ended=ended)
    for i, blob in enumerate(blobs):
        one = SessionRecord(
            b"F" * 32,
            epochs[i],
            seqs[i],
            {name: value[i] for name, value in states.items()},
            {name: value[i] for name, value in outputs.items()},
            start_id=start_ids[i],
            digest=digests[i],
            ended=ended,
        )
        assert blob == encode(one)
