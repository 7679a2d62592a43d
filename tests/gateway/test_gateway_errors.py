"""Bad input over HTTP gets 400/401/404/413 in the OpenAI error shape (never 422 or 500), also
for hypothesis-generated bodies; the API key guards everything but /health."""

from __future__ import annotations

import json

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megascale.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.core.request import CLIENT_REQUEST_ID_MAX_LEN, MAX_STOP_TOKEN_IDS
from services.errors import ConfigError
from services.gateway.config import GatewayConfig

MODEL = "mixtral-gw"
GOOD = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

CASES = [  # (path, body, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"\xff\xfe", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {**GOOD, "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "min_tokens": 3}, 400, "min_tokens"),  # > max_tokens 2
    ("/v1/completions", {**GOOD, "min_tokens": -1}, 400, "min_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 2, "min_tokens": 5}, 400,
     "min_tokens"),
    ("/v1/completions", {**GOOD, "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {**GOOD, "temperature": 1e9}, 400, "temperature"),
    ("/v1/completions", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**GOOD, "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {**GOOD, "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {**GOOD, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": ["a", ""]}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "prompt": "word " * 400}, 400, "prompt"),
    ("/v1/completions", {**GOOD, "max_tokens": 250, "prompt": "word " * 10}, 400, "max_tokens"),
    ("/v1/completions", {**GOOD, "n": 0}, 400, "n"),
    ("/v1/completions", {**GOOD, "n": 65}, 400, "n"),
    ("/v1/completions", {**GOOD, "n": 2, "best_of": 1}, 400, "best_of"),
    ("/v1/completions", {**GOOD, "best_of": 2, "stream": True}, 400, "best_of"),
    ("/v1/completions", {**GOOD, "stop": [""]}, 400, "stop"),
    ("/v1/completions", {**GOOD, "stop": ["x"] * 17}, 400, "stop"),
    ("/v1/completions", {**GOOD, "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ("/v1/completions", {**GOOD, "seed": 1 << 70}, 400, "seed"),
    ("/v1/completions", {**GOOD, "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {**GOOD, "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ("/v1/completions", {**GOOD, "suffix": "x"}, 400, "suffix"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 30}, 400,
     "top_logprobs"),
    ("/v1/completions", {**GOOD, "min_p": 1.5}, 400, "min_p"),
    ("/v1/completions", {**GOOD, "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {**GOOD, "frequency_penalty": -2.5}, 400, "frequency_penalty"),
    ("/v1/completions", {**GOOD, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {**GOOD, "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("/v1/completions", {**GOOD, "logit_bias": {"5": 500}}, 400, "logit_bias"),
    ("/v1/completions", {**GOOD, "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {**GOOD, "bad_words": [" "]}, 400, "bad_words"),
    ("/v1/completions", {**GOOD, "guided_regex": "[a"}, 400, "guided_regex"),
    ("/v1/completions", {**GOOD, "guided_choice": []}, 400, "guided_choice"),
    ("/v1/completions", {**GOOD, "guided_choice": ["a"], "min_tokens": 1}, 400, "min_tokens"),
    ("/v1/completions", {**GOOD, "guided_json": "{not json"}, 400, "guided_json"),
    ("/v1/completions", {**GOOD, "guided_regex": "a", "guided_choice": ["b"]}, 400,
     "guided_choice"),
    ("/v1/completions", {**GOOD, "structured_outputs": {"regex": "a", "choice": ["b"]}}, 400,
     "structured_outputs"),
    ("/v1/completions", {**GOOD, "response_format": {"type": "json_schema"}}, 400,
     "response_format"),
    ("/v1/completions", {**GOOD, "response_format": {"type": "xml"}}, 400, "response_format"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "retrieval"}]}, 400, "tools"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "auto"}, 400, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {
        "name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400,
     "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"tools": []}}, 400,
     "chat_template_kwargs"),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "assistant", "content": "x"}]},
     400, "messages"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -1}, 400,
     "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "model"),
    # every field is honoured or refused: never silently ignored
    pytest.param("/v1/completions", {**GOOD, "logprobs_mode": "raw"}, 400,
                 "logprobs_mode", id="unsupported-field"),
    pytest.param("/v1/completions", {**GOOD, "stream_options": {"per_token": True}},
                 400, "stream_options", id="unsupported-stream-option"),
    pytest.param("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages",
                 id="image-part"),
    # past Python's int-to-str digit limit: json.loads raises ValueError, not a decode error
    pytest.param("/v1/completions", b'{"model": "mixtral-gw", "prompt": "x", "max_tokens": 1'
                 + b"9" * 5000 + b"}", 400, None, id="5000-digit-int"),
    # lone surrogates are valid JSON escapes but not text: refused, never a 500
    pytest.param("/v1/completions",
                 b'{"model": "mixtral-gw", "prompt": "\\ud800", "max_tokens": 2}', 400,
                 "prompt", id="surrogate-prompt"),
    pytest.param("/v1/chat/completions", b'{"model": "mixtral-gw", "max_tokens": 2, '
                 b'"messages": [{"role": "user", "content": "a\\udfff"}]}', 400, "messages",
                 id="surrogate-message"),
    pytest.param("/v1/completions", b'{"model": "mixtral-gw", "prompt": "x", "max_tokens": 2, '
                 b'"stop": ["\\ud800"]}', 400, "stop", id="surrogate-stop"),
    # a field name that is no plain text is named escaped (one line, encodable)
    pytest.param("/v1/completions", b'{"model": "mixtral-gw", "prompt": "x", "max_tokens": 2, '
                 b'"\\n\\ud800": "\\ud800"}', 400, '"\\n\\ud800"', id="surrogate-odd-key"),
    # more text than any max_model_len tokens can hold: refused before tokenizing
    pytest.param("/v1/completions", {**GOOD, "prompt": "x" * 60_000}, 400, "prompt",
                 id="text-past-the-context"),
    pytest.param("/v1/chat/completions", {**CHAT, "messages": [
        {"role": "user", "content": "y" * 60_000}]}, 400, "messages", id="chat-past-the-context"),
    pytest.param("/v1/completions", b"[" * 30_000 + b"]" * 30_000, 400, None,
                 id="nested-too-deeply"),
]


def _check_shape(r: httpx.Response, status: int, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize(("path", "body", "status", "param"), CASES)
def test_bad_input(stack, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(stack.http + path, content=content, timeout=30,
                   headers={"content-type": "application/json"})
    _check_shape(r, status, param)


def test_huge_body_is_413(stack):
    big = json.dumps({**GOOD, "prompt": "a" * (200 << 10)})
    r = httpx.post(stack.http + "/v1/completions", content=big, timeout=30)
    _check_shape(r, 413)

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b" " * 4096
    r = httpx.post(stack.http + "/v1/completions", content=chunks(), timeout=30)
    _check_shape(r, 413)


def test_unknown_route_is_404_in_openai_shape(stack):
    _check_shape(httpx.get(stack.http + "/v1/nothing-here"), 404)


# text, sometimes with lone surrogates (hypothesis leaves them out by default); integers past
# 64 bits
TEXT = st.text(max_size=20) | st.text(st.characters(categories=["Cs", "Ll"]), max_size=20)
SCALAR = (st.none() | st.booleans() | st.integers() | st.integers(min_value=1 << 64)
          | st.floats(allow_nan=False, allow_infinity=False) | TEXT)
JSON = st.recursive(SCALAR, lambda c: st.lists(c, max_size=4)
                    | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
FIELDS = {"model": st.just(MODEL) | JSON, "prompt": TEXT | JSON,
          "max_tokens": st.integers(-5, 8) | JSON, "temperature": st.floats(-1, 3) | JSON,
          "top_p": JSON, "top_k": st.integers(-3, 600) | JSON, "seed": JSON, "stop": JSON,
          "n": JSON, "stream": st.booleans() | JSON, "stop_token_ids": JSON,
          "messages": JSON | st.lists(st.fixed_dictionaries(
              {"role": st.sampled_from(["user", "system", "assistant", "x"]),
               "content": st.text(max_size=10) | JSON}), max_size=3)}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=st.fixed_dictionaries({}, optional=FIELDS) | JSON)
def test_fuzzed_bodies_never_500(stack, path, body):
    if isinstance(body, dict) and body.get("max_tokens") is None:
        body["max_tokens"] = 2  # keep the accepted ones cheap
    r = httpx.post(stack.http + path, content=json.dumps(body).encode(), timeout=60,
                   headers={"content-type": "application/json"})  # \uXXXX for surrogates
    assert r.status_code in (200, 400, 404), r.text
    if r.status_code != 200:
        _check_shape(r, r.status_code)


def test_api_key(stack, tmp_path, gateway_factory):
    gw = gateway_factory(stack.model_dir, [a.grpc for a in stack.mesh.attention], tmp_path,
                       "gateway-key", "--api-key", "s3cret")
    try:
        url = gw.info["http"]
        assert httpx.get(url + "/health").status_code == 200
        _check_shape(httpx.get(url + "/v1/models"), 401)
        _check_shape(httpx.post(url + "/v1/completions", json=GOOD,
                                headers={"Authorization": "Bearer wrong"}), 401)
        ok = httpx.post(url + "/v1/completions", json=GOOD, timeout=60,
                        headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200, ok.text
    finally:
        gw.stop()


def test_cors_when_origins_are_allowed(stack, tmp_path, gateway_factory):
    """--allowed-origins: a browser's preflight is answered before the API key is asked for,
    and responses carry the CORS headers; without the flag (the stack's gateway) none."""
    gw = gateway_factory(stack.model_dir, [a.grpc for a in stack.mesh.attention], tmp_path,
                         "gateway-cors", "--api-key", "s3cret", "--allowed-origins",
                         "https://app.example")
    origin = {"Origin": "https://app.example"}
    try:
        url = gw.info["http"]
        pre = httpx.options(url + "/v1/completions", headers={
            **origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200, pre.text
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        ok = httpx.post(url + "/v1/completions", json=GOOD, timeout=60,
                        headers={**origin, "Authorization": "Bearer s3cret"})
        assert ok.status_code == 200, ok.text
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(url + "/v1/completions", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        gw.stop()
    plain = httpx.post(stack.gateway.info["http"] + "/v1/completions", json=GOOD, timeout=60,
                       headers=origin)
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


def test_config_validation(tmp_path, gw_model_dir):
    with pytest.raises(ConfigError, match="config.json"):
        GatewayConfig(model_dir=str(tmp_path), attention=("127.0.0.1:1",))
    with pytest.raises(ConfigError, match="--attention"):
        GatewayConfig(model_dir=str(gw_model_dir))
    with pytest.raises(ConfigError, match="bad gRPC address"):
        GatewayConfig(model_dir=str(gw_model_dir), attention=("nohost",))
    cfg = GatewayConfig(model_dir=str(gw_model_dir), attention=("127.0.0.1:5",))
    assert cfg.served_model_name == MODEL


@pytest.mark.parametrize("request_id, sampling, field", [
    ("x" * (CLIENT_REQUEST_ID_MAX_LEN + 1), {}, "request_id"),
    ("has space", {}, "request_id"),
    ("ok-id", {"temperature": 1e9}, "sampling.temperature"),
    ("ok-id", {"stop_token_ids": [1] * (MAX_STOP_TOKEN_IDS + 1)}, "sampling.stop_token_ids"),
])
def test_grpc_front_door_applies_the_same_rules(stack, request_id, sampling, field):
    """The gRPC twin refuses what REST refuses, by the one rule set, naming the field."""
    with grpc.insecure_channel(stack.grpc) as ch:
        with pytest.raises(grpc.RpcError) as info:
            list(gateway_pb2_grpc.GatewayStub(ch).Generate(gateway_pb2.GatewayGenerateRequest(
                model=MODEL, text="Hello", request_id=request_id,
                sampling=common_pb2.SamplingParams(max_tokens=2, **sampling)), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field)
