"""KServe v2 / Triton messages <-> domain: tensors, sequence parameters, responses.

Error messages follow Triton's wording where a Triton client would recognise it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np

from service.api import kserve_messages as kv
from service.api.convert import checked_count
from service.errors import InvalidArgument
from service.models import LoadedModel
from service.state.record import Tensors

# Manifest dtype -> KServe datatype; only these cross the edge today.
DATATYPES = {"float32": "FP32", "float16": "FP16"}
NUMPY: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2")}
CONTENTS_FIELD = {"FP32": "fp32_contents"}
CONFIG_TYPES = {"FP32": "TYPE_FP32", "FP16": "TYPE_FP16"}


# rnnserve's own request parameters: the client numbers its steps (exactly-once resends), and names
# its starts. The applied number comes back in the response parameter of the same name.
SEQ_PARAMETER = "rnnserve_seq"
START_ID_PARAMETER = "rnnserve_start_id"


@dataclass(frozen=True, slots=True)
class Sequence:
    """Triton's sequence parameters; `session_id` None: the request is not part of a sequence."""

    session_id: str | None
    start: bool
    end: bool
    seq: int | None = None  # None: the server numbers the step
    start_id: int = 0


def parse_version(version: str) -> int:
    """'' means the newest version (0 in the engine)."""
    if version == "":
        return 0
    if not (version.isascii() and version.isdigit()) or int(version) < 1:
        raise InvalidArgument(f"model version {version!r} is not a positive integer")
    return int(version)


def _bool_parameter(parameters: Any, name: str) -> bool:
    if name not in parameters:
        return False
    parameter = parameters[name]
    if parameter.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidArgument(f"parameter '{name}' must be a bool")
    return bool(parameter.bool_param)


def _int_parameter(parameters: Any, name: str) -> int | None:
    if name not in parameters:
        return None
    parameter = parameters[name]
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"parameter '{name}' must be an integer")
    return int(getattr(parameter, kind))


def sequence_of(request: Any) -> Sequence:
    """sequence_id as int64, uint64 or string; 0 or "" means: not part of a sequence."""
    parameters = request.parameters
    session_id = None
    if "sequence_id" in parameters:
        parameter = parameters["sequence_id"]
        kind = parameter.WhichOneof("parameter_choice")
        if kind in ("int64_param", "uint64_param"):
            value = getattr(parameter, kind)
            session_id = str(value) if value != 0 else None
        elif kind == "string_param":
            # Triton takes any string; percent-encoding maps it onto the session-id alphabet, one to one.
            session_id = quote(parameter.string_param, safe=":@/") or None
        else:
            raise InvalidArgument("parameter 'sequence_id' must be an integer or a string")
    start = _bool_parameter(parameters, "sequence_start")
    end = _bool_parameter(parameters, "sequence_end")
    if session_id is None and (start or end):
        raise InvalidArgument(
            f"inference request to model '{request.model_name}' sets sequence_start or sequence_end "
            "but no sequence_id: give the sequence a non-zero or non-empty id"
        )
    seq = _int_parameter(parameters, SEQ_PARAMETER)
    start_id = _int_parameter(parameters, START_ID_PARAMETER) or 0
    if session_id is None and (seq is not None or start_id):
        raise InvalidArgument(
            f"parameters '{SEQ_PARAMETER}' and '{START_ID_PARAMETER}' number the steps of a sequence: "
            "send them with a sequence_id"
        )
    if seq is not None and seq < 1:
        raise InvalidArgument(f"parameter '{SEQ_PARAMETER}' must be 1 or more (the sequence's step number), got {seq}")
    if start_id < 0:
        raise InvalidArgument(f"parameter '{START_ID_PARAMETER}' must not be negative, got {start_id}")
    return Sequence(session_id, start, end, seq, start_id)


def input_array(request: Any, model: LoadedModel) -> np.ndarray:
    """The request's one input as [B, T, F] float32, from `raw_input_contents` or typed contents."""
    spec = model.manifest.input
    name = model.manifest.name
    if len(request.inputs) != 1:
        raise InvalidArgument(f"expected 1 inputs but got {len(request.inputs)} inputs for model '{name}'")
    tensor = request.inputs[0]
    if tensor.name != spec.name:
        raise InvalidArgument(f"unexpected inference input '{tensor.name}' for model '{name}'")
    expected = DATATYPES[spec.dtype]
    if tensor.datatype != expected:
        raise InvalidArgument(
            f"unexpected datatype {tensor.datatype} for inference input '{tensor.name}', expecting {expected}"
        )
    shape = list(tensor.shape)
    features = model.manifest.features
    if len(shape) != 3 or shape[2] != features or min(shape) < 1:
        raise InvalidArgument(
            f"unexpected shape for input '{tensor.name}' for model '{name}'. Expected [-1,-1,{features}], got {shape}"
        )
    count = checked_count(shape, f"input '{tensor.name}'")
    dtype = NUMPY[expected]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidArgument("raw_input_contents must hold one entry per input")
        raw = request.raw_input_contents[0]
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(
                f"input '{tensor.name}' holds {len(raw)} bytes, shape {shape} of {expected} needs "
                f"{count * dtype.itemsize}"
            )
        values = np.frombuffer(raw, dtype=dtype)
    elif expected not in CONTENTS_FIELD:
        raise InvalidArgument(f"{expected} input '{tensor.name}' must come in raw_input_contents")
    else:
        values = np.asarray(getattr(tensor.contents, CONTENTS_FIELD[expected]), dtype=dtype)
        if len(values) != count:
            raise InvalidArgument(f"input '{tensor.name}' holds {len(values)} values, shape {shape} needs {count}")
    array: np.ndarray = values.reshape(shape).astype(np.float32, copy=False)
    return array


def infer_response(request: Any, model: LoadedModel, outputs: Tensors) -> Any:
    """Outputs [B, T, ...] in `raw_output_contents`; only those the client asked for, if it asked."""
    available = {spec.name: spec for spec in model.outputs}
    wanted = [o.name for o in request.outputs] or list(available)
    for output in wanted:
        if output not in available:
            raise InvalidArgument(f"unexpected inference output '{output}' for model '{model.name}'")
    response = kv.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id)
    for output in wanted:
        datatype = DATATYPES[available[output].dtype]
        value = np.ascontiguousarray(outputs[output], dtype=NUMPY[datatype])
        response.outputs.add(name=output, datatype=datatype, shape=value.shape)
        response.raw_output_contents.append(value.tobytes())
    return response


def model_metadata(models: list[LoadedModel]) -> Any:
    newest = models[-1]
    response = kv.ModelMetadataResponse(
        name=newest.name, versions=[str(m.version) for m in models], platform="onnxruntime_onnx"
    )
    for spec in newest.inputs:
        response.inputs.add(name=spec.name, datatype=DATATYPES[spec.dtype], shape=spec.shape)
    for spec in newest.outputs:
        response.outputs.add(name=spec.name, datatype=DATATYPES[spec.dtype], shape=spec.shape)
    return response


def model_config(model: LoadedModel, max_batch_size: int, idle_s: float, max_wait_us: int) -> Any:
    """Enough of Triton's model configuration for clients that read batching and sequence settings.

    With max_batch_size > 0, dims leave out the batch axis, as in Triton.
    """
    manifest = model.manifest
    config = kv.ModelConfig(
        name=manifest.name,
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        max_batch_size=max_batch_size,
    )
    for spec in model.inputs:
        config.input.add(name=spec.name, data_type=CONFIG_TYPES[DATATYPES[spec.dtype]], dims=spec.shape[1:])
    for spec in model.outputs:
        config.output.add(name=spec.name, data_type=CONFIG_TYPES[DATATYPES[spec.dtype]], dims=spec.shape[1:])
    if manifest.streamable:
        batching = config.sequence_batching
        batching.max_sequence_idle_microseconds = int(idle_s * 1_000_000)
        batching.oldest.max_candidate_sequences = max_batch_size
        batching.oldest.max_queue_delay_microseconds = max_wait_us
        batching.oldest.preserve_ordering = True
        for pair in manifest.state:
            batching.state.add(
                input_name=pair.input,
                output_name=pair.output,
                data_type=CONFIG_TYPES[DATATYPES[pair.dtype]],
                dims=pair.shape[1:],
            )
    return kv.ModelConfigResponse(config=config)
