"""Every generated module imports; every top-level message round-trips with all fields set;
every field is documented; the services work over a real gRPC server on port 0."""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from megascale.v1 import (
    attention_pb2,
    attention_pb2_grpc,
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

V1 = Path(__file__).resolve().parents[2] / "proto" / "megascale" / "v1"
PROTOS = sorted(p.stem for p in V1.glob("*.proto"))
SERVICES = {
    "attention": "Attention",
    "expert": "Expert",
    "scheduler": "Scheduler",
    "gateway": "Gateway",
}


def test_the_five_links_exist() -> None:
    assert PROTOS == ["attention", "common", "expert", "gateway", "scheduler"]


@pytest.mark.parametrize("name", PROTOS)
def test_modules_import_and_package(name: str) -> None:
    pb2 = importlib.import_module(f"megascale.v1.{name}_pb2")
    importlib.import_module(f"megascale.v1.{name}_pb2_grpc")
    assert pb2.DESCRIPTOR.package == "megascale.v1"
    assert pb2.DESCRIPTOR.name == f"megascale/v1/{name}.proto"
    if name in SERVICES:
        grpc_mod = importlib.import_module(f"megascale.v1.{name}_pb2_grpc")
        svc = SERVICES[name]
        for attr in (f"{svc}Stub", f"{svc}Servicer", f"add_{svc}Servicer_to_server"):
            assert hasattr(grpc_mod, attr), f"{name}_pb2_grpc lacks {attr}"


_SCALARS = {
    FieldDescriptor.CPPTYPE_INT32: -7,
    FieldDescriptor.CPPTYPE_INT64: -(2**40),
    FieldDescriptor.CPPTYPE_UINT32: 7,
    FieldDescriptor.CPPTYPE_UINT64: 2**40 + 3,
    FieldDescriptor.CPPTYPE_FLOAT: 0.5,
    FieldDescriptor.CPPTYPE_DOUBLE: 1.25,
    FieldDescriptor.CPPTYPE_BOOL: True,
}


def _value(field: FieldDescriptor):
    if field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
        return field.enum_type.values[-1].number  # the last value is never the 0 default
    if field.cpp_type == FieldDescriptor.CPPTYPE_STRING:
        return b"\x00\xffbytes" if field.type == FieldDescriptor.TYPE_BYTES else "héllo 🎉"
    return _SCALARS[field.cpp_type]


def _other_oneof_member(field: FieldDescriptor) -> bool:
    oneof = field.containing_oneof
    return oneof is not None and field.index != oneof.fields[0].index


def _fill(msg: Message, depth: int = 0) -> None:
    """Set every field of msg (and of nested messages) to a non-default value."""
    assert depth < 8, "recursive message"
    for field in msg.DESCRIPTOR.fields:
        if _other_oneof_member(field):
            continue  # set one member per oneof (the first); the others are tested separately
        target = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_f, val_f = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            if val_f.message_type is not None:
                _fill(target[_value(key_f)], depth + 1)
            else:
                target[_value(key_f)] = _value(val_f)
        elif field.is_repeated and field.message_type is not None:
            _fill(target.add(), depth + 1)
            _fill(target.add(), depth + 1)
        elif field.is_repeated:
            target.extend([_value(field), _value(field)])
        elif field.message_type is not None:
            _fill(target, depth + 1)
        else:
            setattr(msg, field.name, _value(field))


def _top_level_messages() -> Iterator[tuple[str, type[Message]]]:
    for name in PROTOS:
        pb2 = importlib.import_module(f"megascale.v1.{name}_pb2")
        for msg_name in pb2.DESCRIPTOR.message_types_by_name:
            yield f"{name}.{msg_name}", getattr(pb2, msg_name)


MESSAGES = dict(_top_level_messages())


@pytest.mark.parametrize("qualname", sorted(MESSAGES))
def test_message_round_trip(qualname: str) -> None:
    cls = MESSAGES[qualname]
    msg = cls()
    _fill(msg)
    data = msg.SerializeToString(deterministic=True)
    back = cls.FromString(data)
    assert back == msg
    assert back.SerializeToString(deterministic=True) == data
    desc: Descriptor = cls.DESCRIPTOR
    for field in desc.fields:
        if _other_oneof_member(field):
            continue
        if field.is_repeated:
            assert len(getattr(back, field.name)) > 0, field.name
        elif field.has_presence:
            assert back.HasField(field.name), field.name
        else:
            assert getattr(back, field.name) == getattr(msg, field.name) != field.default_value


def test_optional_presence_survives_the_wire() -> None:
    # seed=0 and temperature=0 (greedy) must stay distinguishable from "unset".
    params = common_pb2.SamplingParams(seed=0, temperature=0.0)
    back = common_pb2.SamplingParams.FromString(params.SerializeToString())
    assert back.HasField("seed") and back.HasField("temperature")
    assert not common_pb2.SamplingParams().HasField("seed")


def test_gateway_prompt_is_a_oneof() -> None:
    from megascale.v1 import gateway_pb2

    req = gateway_pb2.GatewayGenerateRequest(text="hi")
    req.token_ids.ids.extend([1, 2])
    assert req.WhichOneof("prompt") == "token_ids"
    back = gateway_pb2.GatewayGenerateRequest.FromString(req.SerializeToString())
    assert back.WhichOneof("prompt") == "token_ids" and list(back.token_ids.ids) == [1, 2]


def test_negative_token_id_is_rejected() -> None:
    with pytest.raises(ValueError):
        attention_pb2.GenerateRequest(prompt_token_ids=[1, -2])


_FIELD = re.compile(r"^\s*(optional\s+|repeated\s+)?(map<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*\d+\s*;(.*)$")


@pytest.mark.parametrize("name", PROTOS)
def test_every_field_has_a_comment(name: str) -> None:
    lines = (V1 / f"{name}.proto").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        m = _FIELD.match(line)
        if m is None:
            continue
        trailing = "//" in m.group(4)
        above = i > 0 and lines[i - 1].strip().startswith("//")
        if not (trailing or above):
            undocumented.append(f"{name}.proto:{i + 1}: {m.group(3)}")
    assert not undocumented, "fields without a comment: " + ", ".join(undocumented)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_services_document_error_codes(name: str) -> None:
    text = (V1 / f"{name}.proto").read_text()
    head = text[: text.index("service ")]
    for code in ("INVALID_ARGUMENT", "UNAVAILABLE", "DEADLINE_EXCEEDED"):
        assert code in head, f"{name}.proto does not document {code} above its service"


class _Attention(attention_pb2_grpc.AttentionServicer):
    """A minimal replica that echoes the prompt back, to exercise the wire contract."""

    def Generate(self, request, context):  # noqa: N802 - gRPC method name
        if not request.prompt_token_ids:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids is empty")
        start = len(request.output_token_ids)
        for i, tok in enumerate(request.prompt_token_ids):
            yield attention_pb2.GenerateEvent(token_ids=[tok], index=start + i)
        yield attention_pb2.GenerateEvent(
            index=start + len(request.prompt_token_ids),
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(
                prompt_tokens=len(request.prompt_token_ids),
                completion_tokens=start + len(request.prompt_token_ids),
            ),
        )


@pytest.fixture()
def server() -> Iterator[str]:
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    attention_pb2_grpc.add_AttentionServicer_to_server(_Attention(), srv)
    # The base Servicer answers UNIMPLEMENTED for every method.
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(scheduler_pb2_grpc.SchedulerServicer(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        srv.stop(grace=None)


def test_streaming_over_a_real_server(server: str) -> None:
    with grpc.insecure_channel(server) as channel:
        stub = attention_pb2_grpc.AttentionStub(channel)
        req = attention_pb2.GenerateRequest(
            request_id="r1",
            prompt_token_ids=[5, 6, 7],
            output_token_ids=[9],
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=4, seed=3),
        )
        events = list(stub.Generate(req, timeout=10))
        assert [list(e.token_ids) for e in events[:-1]] == [[5], [6], [7]]
        assert [e.index for e in events] == [1, 2, 3, 4]
        last = events[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 4)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(attention_pb2.GenerateRequest(request_id="r2"), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        sched = scheduler_pb2_grpc.SchedulerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            sched.PickReplica(scheduler_pb2.PickReplicaRequest(prompt_tokens=3), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
