"""Our KServe v2 / Triton protocol definition agrees with the copy compiled into `tritonclient`."""

from __future__ import annotations

import pytest
from tritonclient.grpc import model_config_pb2, service_pb2

from service.api import kserve_messages

THEIRS = service_pb2.DESCRIPTOR.pool
OURS = kserve_messages.POOL


def our_messages():
    for file in ("inference/grpc_service.proto", "inference/model_config.proto"):
        stack = list(OURS.FindFileByName(file).message_types_by_name.values())
        while stack:
            message = stack.pop()
            if not message.GetOptions().map_entry:
                yield message
            stack.extend(message.nested_types)


@pytest.mark.parametrize("message", sorted(our_messages(), key=lambda m: m.full_name), ids=lambda m: m.full_name)
def test_every_field_matches_triton(message):
    theirs = {f.name: f for f in THEIRS.FindMessageTypeByName(message.full_name).fields}
    for field in message.fields:
        other = theirs.get(field.name)
        assert other is not None, f"{message.full_name}.{field.name} is not in Triton's protocol"
        assert (field.number, field.type, field.is_repeated) == (
            other.number,
            other.type,
            other.is_repeated,
        ), field.name
        if field.message_type is not None:
            assert field.message_type.full_name == other.message_type.full_name
        if field.enum_type is not None:
            assert field.enum_type.full_name == other.enum_type.full_name
        ours_oneof = field.containing_oneof.name if field.containing_oneof else None
        their_oneof = other.containing_oneof.name if other.containing_oneof else None
        assert ours_oneof == their_oneof, field.name


def test_data_types_match_triton():
    ours = {v.name: v.number for v in kserve_messages.DataType.values}
    theirs = {v.name: v.number for v in model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"].values}
    assert ours == theirs


def test_every_method_matches_triton():
    ours = OURS.FindServiceByName(kserve_messages.SERVICE)
    theirs = {m.name: m for m in THEIRS.FindServiceByName(kserve_messages.SERVICE).methods}
    for method in ours.methods:
        other = theirs[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name
        assert (method.client_streaming, method.server_streaming) == (
            other.client_streaming,
            other.server_streaming,
        )
