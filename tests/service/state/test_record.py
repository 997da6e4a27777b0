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


def _live_records(rng, count, steps=(1,)):
    """Live records of one model (states h0 [8] float32, c0 [2, 3] float16; 2 outputs), each with a chunk of
    time steps drawn from `steps`."""
    records = []
    for i in range(count):
        t = int(rng.choice(steps))
        states = {"h0": rng.random(8, np.float32), "c0": rng.random((2, 3)).astype(np.float16)}
        outputs = {"logits": rng.random((t, 4), np.float32), "p": rng.random((t, 1), np.float32)}
        records.append(SessionRecord(b"F" * 32, i + 1, i + 2, states, outputs, start_id=i, digest=bytes([i]) * 16))
    return records


def _layout():
    from service.state.record import state_layout

    return state_layout(b"F" * 32, {"h0": np.zeros(8, np.float32), "c0": np.zeros((2, 3), np.float16)}, outputs=2)


@pytest.mark.parametrize("steps", [(1,), (1, 2, 5)])
def test_states_read_from_many_records_bytes_equal_their_arrays_stacked(steps):
    from service.state.record import stack_states

    rng = np.random.default_rng(2)
    records = _live_records(rng, 9, steps)
    layout = _layout()
    blobs = [encode(r) for r in records] + [layout.fresh]
    stacked = stack_states(layout, blobs)
    assert stacked is not None and list(stacked) == ["h0", "c0"]
    for name in ("h0", "c0"):
        want = np.stack([r.states[name] for r in records] + [np.zeros_like(records[0].states[name])])
        assert stacked[name].dtype == want.dtype and stacked[name].flags.c_contiguous
        np.testing.assert_array_equal(stacked[name], want)


def test_records_laid_out_otherwise_are_not_read_from_their_bytes():
    from service.state.record import stack_states

    rng = np.random.default_rng(3)
    layout = _layout()
    good = [encode(r) for r in _live_records(rng, 3)]
    record = _live_records(rng, 1)[0]
    others = {
        "states in another order": SessionRecord(
            record.fingerprint, 1, 1, dict(reversed(record.states.items())), record.outputs
        ),
        "another model": SessionRecord(b"G" * 32, 1, 1, record.states, record.outputs),
        "a tombstone": SessionRecord(record.fingerprint, 1, 1, {}, record.outputs, ended=True),
        "another state dtype": SessionRecord(
            record.fingerprint, 1, 1, {"h0": record.states["h0"], "c0": record.states["c0"].astype(np.float32)}, {}
        ),
        "one output fewer": SessionRecord(
            record.fingerprint, 1, 1, record.states, {"logits": record.outputs["logits"]}
        ),
    }
    for why, other in others.items():
        assert stack_states(layout, [*good, encode(other)]) is None, why
    v1 = bytearray(encode(record))
    struct.pack_into("<H", v1, 4, 1)  # the format field of an older release's header
    assert stack_states(layout, [*good, bytes(v1)]) is None


def test_a_record_made_from_its_bytes_reads_its_arrays_when_asked():
    record = _live_records(np.random.default_rng(4), 1, (3,))[0]
    blob = encode(record)
    lazy = SessionRecord(record.fingerprint, record.epoch, record.seq, start_id=record.start_id, blob=blob)
    assert lazy.encoded() is blob and record.encoded() == blob
    for name in record.states:
        np.testing.assert_array_equal(lazy.states[name], record.states[name])
    for name in record.outputs:
        np.testing.assert_array_equal(lazy.outputs[name], record.outputs[name])
    assert decode(blob).blob is blob  # a loaded record keeps its bytes, for the next batch to read
    with pytest.raises(ValueError, match="needs its arrays or its encoding"):
        SessionRecord(record.fingerprint, 1, 1)
