"""Corrupt or foreign session records in Redis, systematically: a record cut anywhere, a wrong magic or
format, counts or shapes that do not fit, an unknown dtype, trailing bytes, random bytes, a fingerprint
of no loaded model. The session is refused (DATA_LOSS, or FAILED_PRECONDITION for a model version not
loaded here), its stored bytes are left as they were, the other sessions of the same message step on,
and a new start replaces the record."""

from __future__ import annotations

import random
import struct

import grpc
import numpy as np
import redis

from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.client import step_request
from service.state.record import _HEADER
from service.state.store import session_key
from tests.conftest import vocabulary, written_then_read
from tests.service.stored import replace_record, stored_record

EYE = np.eye(len(vocabulary()), dtype=np.float32)
HEALTHY = [f"well-{i}" for i in range(5)]
VICTIM = "victim"
FINGERPRINT = slice(8, 40)  # in the header: magic, format, flags, then the fingerprint


def corruptions(record: bytes) -> list[tuple[str, bytes]]:
    rng = random.Random(7)
    cases = [(f"cut at {k}", record[:k]) for k in sorted({0, 1, 3, 4, 6, 8, 40, 83, 84, 85, 90, len(record) - 1})]
    cases += [(f"cut at {k}", record[:k]) for k in rng.sample(range(90, len(record) - 1), 6)]
    cases += [
        ("bad magic", b"XXXX" + record[4:]),
        ("format 3", record[:4] + struct.pack("<H", 3) + record[6:]),
        ("format 0", record[:4] + struct.pack("<H", 0) + record[6:]),
        ("one state fewer", record[:80] + struct.pack("<H", struct.unpack_from("<H", record, 80)[0] - 1) + record[82:]),
        ("an output more", record[:82] + struct.pack("<H", struct.unpack_from("<H", record, 82)[0] + 1) + record[84:]),
        ("a trailing byte", record + b"\x00"),
        ("unknown dtype", record[: _HEADER.size + 2] + b"\x09" + record[_HEADER.size + 3 :]),
        ("fp16 dtype", record[: _HEADER.size + 2] + b"\x02" + record[_HEADER.size + 3 :]),
    ]
    cases += [(f"random {n} bytes", rng.randbytes(n)) for n in (1, 84, 500, len(record))]
    return cases


def _shape_changed(record: bytes) -> bytes:
    """The first state tensor's first dimension halved, its data cut to fit: well formed, wrong shape."""
    offset = _HEADER.size
    name_len, _, ndim = struct.unpack_from("<HBB", record, offset)
    dims_at = offset + 4 + name_len
    dims = list(struct.unpack_from(f"<{ndim}I", record, dims_at))
    size = 4 * int(np.prod(dims))
    data_at = dims_at + 4 * ndim
    halved = [max(1, dims[0] // 2), *dims[1:]]
    new_size = 4 * int(np.prod(halved))
    return (
        record[:dims_at]
        + struct.pack(f"<{ndim}I", *halved)
        + record[data_at : data_at + new_size]
        + record[data_at + size :]
    )


async def test_a_corrupt_record_refuses_its_session_only_and_is_left_as_it_was(start_server, redis_store_url):
    app = await start_server(url=redis_store_url)
    target = f"127.0.0.1:{app.port}"
    store = redis.Redis.from_url(redis_store_url)
    key = session_key("rnnserve", "charlm", VICTIM)

    async def batch(steps: list[pb.StepRequest]) -> dict[str, pb.StepResponse]:
        (result,) = await written_then_read(
            target, lambda channel: pb_grpc.RnnServeStub(channel).StreamBatch(), [pb.StepBatch(steps=steps)]
        )
        return {r.session_id: r for r in result.responses}

    seq = 1
    first = await batch([step_request("charlm", sid, 1, EYE[[i]]) for i, sid in enumerate([*HEALTHY, VICTIM])])
    assert not any(r.HasField("error") for r in first.values())
    original = stored_record(store, key)
    assert original is not None
    foreign = original[: FINGERPRINT.start] + bytes(32) + original[FINGERPRINT.stop :]
    cases = [*corruptions(original), ("a shape that does not fit", _shape_changed(original))]
    cases.append(("a fingerprint of no loaded model", foreign))
    for what, corrupt in cases:
        replace_record(store, key, corrupt)
        app.engine.cache.forget(key)  # read from the store, not this replica's copy
        seq += 1
        steps = [step_request("charlm", sid, seq, EYE[[seq % len(EYE)]]) for sid in HEALTHY]
        answers = await batch([*steps, step_request("charlm", VICTIM, 2, EYE[[2]])])
        refused = answers[VICTIM]
        expected = grpc.StatusCode.FAILED_PRECONDITION if corrupt is foreign else grpc.StatusCode.DATA_LOSS
        assert refused.error.code == expected.value[0], (what, refused.error)
        assert stored_record(store, key) == corrupt, f"{what}: the refused step changed the stored record"
        for sid in HEALTHY:
            assert not answers[sid].HasField("error") and answers[sid].seq == seq, (what, answers[sid])
    # The record put back, the session goes on where it was; a new start would have replaced it too.
    replace_record(store, key, original)
    app.engine.cache.forget(key)
    resumed = await batch([step_request("charlm", VICTIM, 2, EYE[[2]])])
    assert not resumed[VICTIM].HasField("error") and resumed[VICTIM].seq == 2
    replace_record(store, key, b"garbage")
    app.engine.cache.forget(key)
    restarted = await batch([step_request("charlm", VICTIM, 1, EYE[[1]], start_id=99)])
    assert not restarted[VICTIM].HasField("error") and restarted[VICTIM].seq == 1
    store.close()
