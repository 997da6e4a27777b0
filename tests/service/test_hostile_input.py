"""Hostile and malformed requests, generated: whatever a client sends, every request gets an answer with
a documented status, never INTERNAL or UNKNOWN, the server never crashes, and a refused request changes
no stored state. A real server in its own process; sync gRPC stubs."""

from __future__ import annotations

import math
import re
import struct
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.process import ServerProcess, free_port
from service.api.convert import tensor_to_array
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.pb.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from service.errors import InvalidArgument
from tests.conftest import TEST_REPO

FEATURES = 84
# Statuses a step may be refused with (README, "Sessions"); a server fault would be INTERNAL or UNKNOWN.
DOCUMENTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ABORTED,
}
CODES = {code.value[0]: code for code in grpc.StatusCode}


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    server = ServerProcess.rnnserve(
        free_port(), TEST_REPO, None, "--max-steps-per-message", "16", metrics_port=METRICS_PORT
    )
    server.start()
    yield f"127.0.0.1:{server.port}"
    assert server.stop() == 0  # and it drains and exits cleanly after all of it


_UINT64 = st.sampled_from([0, 1, 2**64 - 1]) | st.integers(0, 2**64 - 1)
_DIM = st.sampled_from([0, 1, 2, FEATURES, FEATURES + 1, 1025, 2**31, 2**62, -1]) | st.integers(-3, 8)
_FLOATS = st.sampled_from([0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 3.4e38, 1e-45])


def _fitting(shape: list[int] | tuple[int, ...]) -> int | None:
    """The element count of `shape`, if it is a real shape small enough for one message (oversize
    messages are tested apart)."""
    if shape and all(d >= 0 for d in shape) and math.prod(shape) <= 4 * FEATURES:
        return math.prod(shape)
    return None


@st.composite
def _tensor(draw: st.DrawFn) -> pb.Tensor:
    shape = draw(st.lists(_DIM, max_size=4))
    tensor = pb.Tensor(shape=shape)
    kind = draw(st.sampled_from(["raw", "data", "both", "none", "fitting raw"]))
    count = draw(st.integers(0, 3 * FEATURES))
    if kind == "fitting raw" and (fitting := _fitting(shape)) is not None:
        count = fitting
    values = [draw(_FLOATS) for _ in range(min(count, 8))] + [0.5] * max(0, count - 8)
    if kind in ("raw", "both", "fitting raw"):
        tensor.raw = struct.pack(f"<{len(values)}f", *values) + draw(st.sampled_from([b"", b"\x00"]))
    if kind in ("data", "both"):
        tensor.data.extend(values)
    return tensor


_SESSION_IDS = st.sampled_from(["", "a", "x" * 128, "x" * 129, "a/b", "a b", "é", "\x00", "{x}", "s:1"]) | st.text(
    max_size=140
)


@st.composite
def _request(draw: st.DrawFn) -> pb.StepRequest:
    return pb.StepRequest(
        model=draw(st.just("charlm") | st.sampled_from(["charlm", "", "nope", "charlm/1", "CHARLM", "c" * 300])),
        version=draw(st.just(0) | st.sampled_from([0, 1, 2, -1, 2**63 - 1])),
        session_id=draw(_SESSION_IDS),
        seq=draw(_UINT64),  # uint64 on the wire: 0 and 2**64 - 1 are its extremes
        start=draw(st.booleans()),
        end=draw(st.booleans()),
        start_id=draw(_UINT64),
        input=draw(_tensor()),
    )


def _refusal(response: pb.StepResponse) -> grpc.StatusCode | None:
    return CODES[response.error.code] if response.HasField("error") else None


def _exists(stub: pb_grpc.RnnServeStub, model: str, session_id: str) -> bool:
    try:
        stub.GetSession(pb.SessionRef(model=model, session_id=session_id), timeout=10)
    except grpc.RpcError as err:
        assert err.code() in DOCUMENTED, err  # type: ignore[attr-defined]
        return False
    return True


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(_request(), min_size=1, max_size=6))
def test_every_request_on_a_stream_is_answered_with_a_documented_status(target: str, requests) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        existed = {(r.model, r.session_id): _exists(stub, r.model, r.session_id) for r in requests}
        responses = list(stub.Stream(iter(requests), timeout=30))
        assert len(responses) == len(requests)
        for request, response in zip(requests, responses, strict=True):
            code = _refusal(response)
            assert code is None or code in DOCUMENTED, (request, response)
            assert code is None or response.error.message, "a refusal says what to do"
            if code is not None and request.start and not existed[(request.model, request.session_id)]:
                # A refused start created nothing (a start that another request of the list applied may).
                started = any(
                    r.start and r.session_id == request.session_id and r.model == request.model and _refusal(a) is None
                    for r, a in zip(requests, responses, strict=True)
                )
                assert started or not _exists(stub, request.model, request.session_id), request


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(_request(), max_size=20), batch_id=_UINT64)
def test_every_step_of_a_batch_is_answered_in_band(target: str, batch, batch_id: int) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        (result,) = list(stub.StreamBatch(iter([pb.StepBatch(steps=batch, id=batch_id)]), timeout=30))
    assert result.id == batch_id and len(result.responses) == len(batch)
    for request, response in zip(batch, result.responses, strict=True):
        code = _refusal(response)
        assert code is None or code in DOCUMENTED, (request, response)
        if len(batch) > 16:  # --max-steps-per-message 16: every step refused, none applied
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED


_TYPICAL = {
    "sequence_id": "int64",
    "sequence_start": "bool",
    "sequence_end": "bool",
    "rnnserve_seq": "int64",
    "rnnserve_start_id": "uint64",
    "other": "string",
}
_PARAMETERS = list(_TYPICAL)


@st.composite
def _infer_request(draw: st.DrawFn) -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(
        # Mostly the served model, so that most requests get past its lookup to the other checks.
        model_name=draw(st.just("charlm") | st.sampled_from(["charlm", "", "nope", "charlm/1"])),
        model_version=draw(st.just("") | st.sampled_from(["", "1", "2", "x", "-1", "99999999999999999999"])),
        id=draw(st.text(max_size=10)),
    )
    for name in draw(st.lists(st.sampled_from(_PARAMETERS), unique=True, max_size=5)):
        parameter = message.parameters[name]
        # Mostly of the type the parameter takes, so that requests get past it to the checks after it.
        kind = draw(st.just(_TYPICAL[name]) | st.sampled_from(["int64", "bool", "string", "uint64", "double"]))
        if kind == "int64":
            parameter.int64_param = draw(st.sampled_from([0, 1, 2, -1, -(2**63)]) | st.integers(-(2**63), 2**63 - 1))
        elif kind == "bool":
            parameter.bool_param = draw(st.booleans())
        elif kind == "string":
            parameter.string_param = draw(st.sampled_from(["1", "abc", ""]) | st.text(max_size=12))
        elif kind == "uint64":
            parameter.uint64_param = draw(_UINT64)
        else:
            parameter.double_param = draw(st.floats(allow_nan=True, allow_infinity=True))
    for _ in range(draw(st.integers(0, 2))):
        tensor = message.inputs.add(
            name=draw(st.sampled_from(["x", "", "y"])),
            datatype=draw(st.sampled_from(["FP32", "FP64", "INT32", "BYTES", "FP16", "BOOL", ""])),
            shape=draw(st.lists(_DIM, max_size=4)),
        )
        values = [draw(_FLOATS) for _ in range(draw(st.integers(0, 4)))]
        if draw(st.booleans()):
            fitting = _fitting(tuple(tensor.shape))
            count = 3 if fitting is None else fitting
            message.raw_input_contents.append(
                struct.pack(f"<{count}f", *([0.25] * count)) + draw(st.binary(max_size=3))
            )
        else:
            tensor.contents.fp32_contents.extend(values)
    return message


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(_infer_request(), min_size=1, max_size=5))
def test_every_triton_request_is_answered_on_the_stream(target: str, requests) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        responses = list(stub.ModelStreamInfer(iter(requests), timeout=30))
    assert len(responses) == len(requests)  # in-band errors: the stream stays open for the rest
    for response in responses:
        assert response.error_message or response.HasField("infer_response"), response


def test_a_message_over_the_size_limit_ends_its_stream_with_resource_exhausted(target: str) -> None:
    """The one refusal that is not in-band: gRPC refuses a message over max_message_bytes (4 MiB) before
    the server sees it."""
    huge = pb.StepRequest(model="charlm", session_id="big", seq=1, start=True)
    huge.input.shape.extend([12_500, FEATURES])
    huge.input.raw = bytes(4 * 12_500 * FEATURES)  # 4.2 MB
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as refused:
        list(pb_grpc.RnnServeStub(channel).Stream(iter([huge]), timeout=30))
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]


def test_after_the_fuzzing_no_request_was_a_server_error(target: str) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    faults = re.findall(r'^rnnserve_errors_total\{[^}]*code="(?:INTERNAL|UNKNOWN)"[^}]*\} (\S+)', text, re.M)
    assert sum(float(v) for v in faults) == 0, [line for line in text.splitlines() if "INTERNAL" in line]
    refused = re.findall(r"^rnnserve_errors_total\{[^}]*\} (\S+)", text, re.M)
    assert sum(float(v) for v in refused) > 100  # the fuzzing did reach the server's checks


def test_after_the_fuzzing_the_server_still_serves(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        x = struct.pack(f"<{FEATURES}f", *([0.0] * 3 + [1.0] + [0.0] * (FEATURES - 4)))
        request = pb.StepRequest(
            model="charlm", session_id="after", seq=1, start=True, input=pb.Tensor(shape=[1, FEATURES], raw=x)
        )
        (response,) = list(stub.Stream(iter([request]), timeout=30))
    assert not response.HasField("error") and response.seq == 1


@pytest.mark.parametrize("shape", [[0, 2**31, 2**31], [0, 2**62], [2**31, 0, 4], [-1, -84]])
def test_shapes_no_array_can_have_are_refused_as_invalid(shape: list[int]) -> None:
    """Found by the fuzzing: numpy refused [0, 2**31, 2**31] with a ValueError that ended the stream."""
    with pytest.raises(InvalidArgument):
        tensor_to_array(pb.Tensor(shape=shape))


def test_a_session_id_ending_in_a_newline_is_refused(target: str) -> None:
    """The id check covers the whole id (a `$` in a pattern matches before a final newline)."""
    x = struct.pack(f"<{FEATURES}f", *([1.0] + [0.0] * (FEATURES - 1)))
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        for session_id in ("trail\n", "x" * 128 + "\n"):
            request = pb.StepRequest(
                model="charlm", session_id=session_id, seq=1, start=True, input=pb.Tensor(shape=[1, FEATURES], raw=x)
            )
            (response,) = list(stub.Stream(iter([request]), timeout=30))
            assert _refusal(response) is grpc.StatusCode.INVALID_ARGUMENT, response
