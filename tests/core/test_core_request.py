"""The request vocabulary (services/core/request.py): limits, the request-id rule, FinishReason
and the one proto conversion."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megascale.v1 import common_pb2
from services.core.request import (
    CLIENT_REQUEST_ID_MAX_LEN,
    MAX_ATTEMPTS,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPERATURE,
    REQUEST_ID_MAX_LEN,
    U32_MAX,
    U64_MAX,
    FinishReason,
    InvalidField,
    SamplingParams,
    attempt_request_id,
    check_request_id,
    sampling_from_proto,
    sampling_to_proto,
)


def test_the_vocabulary_imports_without_torch():
    code = ("import sys; import services.core.request; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": MAX_TEMPERATURE * 1.01}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"top_k": U32_MAX + 1}, "top_k"), ({"top_k": True}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": U32_MAX + 1}, "max_tokens"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"), ({"min_tokens": -1}, "min_tokens"),
    ({"seed": -1}, "seed"), ({"seed": U64_MAX + 1}, "seed"),
    ({"stop_token_ids": (1,) * (MAX_STOP_TOKEN_IDS + 1)}, "stop_token_ids"),
    ({"stop_token_ids": (-1,)}, "stop_token_ids"),
])
def test_each_limit_names_its_field(kwargs, field):
    with pytest.raises(InvalidField) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_limits_are_inclusive():
    p = SamplingParams(temperature=MAX_TEMPERATURE, top_k=U32_MAX, max_tokens=U32_MAX,
                       min_tokens=U32_MAX, seed=U64_MAX,
                       stop_token_ids=tuple(range(MAX_STOP_TOKEN_IDS)))
    assert p.max_tokens == U32_MAX and len(p.stop_token_ids) == MAX_STOP_TOKEN_IDS
    # max_tokens None (until the context is full) still bounds min_tokens by the wire width
    assert SamplingParams(max_tokens=None, min_tokens=U32_MAX).max_tokens is None


@pytest.mark.parametrize("rid, ok", [
    ("a", True), ("x" * REQUEST_ID_MAX_LEN, True), ("cmpl-0123abcd.2", True),
    ("", False), ("x" * (REQUEST_ID_MAX_LEN + 1), False), ("has space", False),
    ("tab\t", False), ("é", False),
])
def test_request_id_rule(rid, ok):
    if ok:
        assert check_request_id(rid) == rid
    else:
        with pytest.raises(InvalidField, match="request_id"):
            check_request_id(rid)


def test_every_client_id_leaves_room_for_every_attempt():
    longest = "x" * CLIENT_REQUEST_ID_MAX_LEN
    ids = {attempt_request_id(longest, a) for a in range(MAX_ATTEMPTS)}
    assert len(ids) == MAX_ATTEMPTS
    assert max(map(len, ids)) == REQUEST_ID_MAX_LEN
    with pytest.raises(ValueError):
        attempt_request_id("r", MAX_ATTEMPTS)
    with pytest.raises(InvalidField):  # a longer id does not fit: refused, never truncated
        attempt_request_id("x" * (CLIENT_REQUEST_ID_MAX_LEN + 1), MAX_ATTEMPTS - 1)


def test_finish_reason_covers_the_proto_enum_both_ways():
    numbers = {v.number for v in common_pb2.FinishReason.DESCRIPTOR.values
               if v.name != "FINISH_REASON_UNSPECIFIED"}
    assert {r.proto for r in FinishReason} == numbers
    for r in FinishReason:
        assert FinishReason.from_proto(r.proto) is r
        assert common_pb2.FinishReason.Name(r.proto) == f"FINISH_REASON_{r.name}"
    assert FinishReason.from_proto(common_pb2.FINISH_REASON_UNSPECIFIED) is None
    assert FinishReason.STOP == "stop" and f"{FinishReason.LENGTH}" == "length"


def test_proto_round_trip_and_wire_defaults():
    p = SamplingParams(temperature=0.5, top_p=0.25, top_k=7, max_tokens=9, seed=U64_MAX,
                       stop_token_ids=(3, 4), ignore_eos=True, min_tokens=2)
    assert sampling_from_proto(sampling_to_proto(p)) == p
    unset = sampling_from_proto(common_pb2.SamplingParams())
    assert unset == SamplingParams(max_tokens=None)  # temperature 1, top_p 1, top_k off
    assert not sampling_to_proto(SamplingParams(seed=None)).HasField("seed")
    assert sampling_to_proto(SamplingParams(max_tokens=None)).max_tokens == 0
    with pytest.raises(InvalidField, match="temperature"):
        sampling_from_proto(common_pb2.SamplingParams(temperature=1e9))
