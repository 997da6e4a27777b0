"""StepBatchResults written by hand are the messages protobuf would write: parsed, equal; byte for byte where a
step has at most one output (a map of several may be written in another order, which parses the same)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from service.api.convert import fill_tensors
from service.api.pb.rnnserve.v1 import rnnserve_pb2 as pb
from service.api.wire import BatchResultWriter, varint
from service.sessions import StepResult

UINT64 = st.integers(0, 2**64 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int64, np.dtype(">f4")]))
    values = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) * draw(st.floats(-1e3, 1e3))
    array = values.astype(dtype)
    if array.ndim == 2 and draw(st.booleans()):
        array = array.T  # not C-ordered: sent as its C-ordered copy
    return array


results = st.builds(
    StepResult,
    model=st.text(max_size=20),
    version=INT64,
    session_id=st.text(max_size=40),
    seq=UINT64,
    outputs=st.dictionaries(st.text(max_size=10), arrays(), max_size=3),
    replayed=st.booleans(),
)


def built(answer: StepResult) -> pb.StepResponse:
    """The response as protobuf builds it."""
    response = pb.StepResponse(
        session_id=answer.session_id,
        seq=answer.seq,
        model=answer.model,
        version=answer.version,
        replayed=answer.replayed,
    )
    fill_tensors(response.outputs, answer.outputs)
    return response


@settings(max_examples=400, deadline=None)
@given(answer=results)
def test_a_result_is_the_response_protobuf_writes(answer):
    written = BatchResultWriter().result(answer)
    expected = pb.StepBatchResult(responses=[built(answer)])
    assert pb.StepBatchResult.FromString(written) == expected
    if len(answer.outputs) <= 1:
        assert written == expected.SerializeToString()


@settings(max_examples=200, deadline=None)
@given(
    answers=st.lists(st.one_of(results, st.builds(pb.StepResponse, session_id=st.text(max_size=10))), max_size=6),
    batch_id=UINT64,
)
def test_a_batch_of_results_and_embedded_responses_is_the_message_protobuf_writes(answers, batch_id):
    writer = BatchResultWriter()  # one writer for every batch: what it keeps must not leak between steps
    responses, expected = [], pb.StepBatchResult(id=batch_id)
    for answer in answers:
        if isinstance(answer, StepResult):
            responses.append(writer.result(answer))
            expected.responses.append(built(answer))
        else:
            answer.error.code, answer.error.message = 5, "not found"
            responses.append(writer.embedded(answer.SerializeToString()))
            expected.responses.append(answer)
    assert pb.StepBatchResult.FromString(writer.batch(responses, batch_id)) == expected


@given(UINT64)
def test_a_varint_reads_back_as_its_value(value):
    assert pb.StepBatchResult.FromString(b"\x10" + varint(value)).id == value
