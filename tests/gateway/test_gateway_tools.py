"""Tool calling without a mesh: tools / tool_choice validation, the hermes parser (whole and
streamed), and tool messages, tools, ``add_generation_prompt`` and ``chat_template_kwargs``
through a real checkpoint's chat template (ChatML, qwen3_moe demo)."""

from __future__ import annotations

import json

import pytest

from services.core.demo import write_random_checkpoint
from services.gateway.errors import GatewayError
from services.gateway.openai_api import ChatRequest, _messages, parse
from services.gateway.text import ModelText
from services.gateway.tools import ToolStream, calls_of, parse_hermes, plan

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def test_plan_modes_and_refusals():
    assert plan(None, None, "hermes") is None
    assert plan([TOOL], None, "hermes").mode == "auto"
    named = plan([TOOL], {"type": "function", "function": {"name": "get_weather"}}, "hermes")
    assert named.mode == "named" and named.schema == TOOL["function"]["parameters"]
    req = plan([TOOL], "required", "hermes")
    assert req.schema["items"]["anyOf"][0]["properties"]["name"] == {"enum": ["get_weather"]}
    for tools, choice, parser in (([TOOL], "auto", "none"), ([TOOL], "sometimes", "hermes"),
                                  (None, "required", "hermes"), ([{"type": "x"}], None, "hermes"),
                                  ([TOOL], {"type": "function", "function": {"name": "z"}},
                                   "hermes")):
        with pytest.raises(GatewayError) as err:
            plan(tools, choice, parser)
        assert err.value.status == 400


def test_hermes_calls_are_parsed_and_other_text_kept():
    text = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
            '\n</tool_call> and <tool_call>not json</tool_call>')
    content, calls = parse_hermes(text)
    assert [c.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}
    assert content == "Let me check.  and <tool_call>not json</tool_call>"
    assert parse_hermes("no calls here") == ("no calls here", [])
    p = plan([TOOL], "required", "hermes")
    _, calls = calls_of(p, '[{"name": "get_weather", "parameters": {"city": "Rome"}}]')
    assert json.loads(calls[0].arguments) == {"city": "Rome"}


def test_hermes_stream_holds_a_call_until_it_closes():
    ts = ToolStream(plan([TOOL], "auto", "hermes"))
    pieces = ["Sure <to", "ol_call>{\"name\": \"get_weather\", ", "\"arguments\": {}}</tool",
              "_call> done"]
    out, calls = [], []
    for i, p in enumerate(pieces):
        content, deltas = ts.push(p, i == len(pieces) - 1)
        out.append(content)
        calls += deltas
    assert out == ["Sure ", "", "", " done"]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
    assert calls[0]["index"] == 0
    one = ToolStream(plan([TOOL], "auto", "hermes", parallel=False))
    block = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    assert len(one.push(block + block, True)[1]) == 1
    assert len(calls_of(plan([TOOL], "auto", "hermes", parallel=False), block * 2)[1]) == 1
    assert len(calls_of(plan([TOOL], "auto", "hermes"), block * 2)[1]) == 2
    tail = ToolStream(plan([TOOL], "auto", "hermes"))
    assert tail.push("a <tool_call>{", True) == ("a <tool_call>{", [])  # never closed: text


@pytest.fixture(scope="module")
def chatml(tmp_path_factory) -> ModelText:
    d = write_random_checkpoint(tmp_path_factory.mktemp("q") / "qwen-tools", "qwen3_moe",
                                layers=1, hidden=32, intermediate=32, experts=4, top_k=2,
                                heads=2, kv_heads=1, vocab=512, max_position=256, seed=2)
    return ModelText(str(d), "qwen-tools")


def test_tool_messages_and_template_options_reach_the_template(chatml):
    req = parse(ChatRequest, {"model": "qwen-tools", "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"}]})
    msgs = _messages(req.messages)
    rendered = chatml.tokenizer.decode(chatml.encode_chat(msgs, tools=[TOOL]))
    assert "<|im_start|>tool\nsunny, 21 C<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    bare = chatml.tokenizer.decode(chatml.encode_chat(msgs, add_generation_prompt=False))
    assert bare.endswith("sunny, 21 C<|im_end|>\n")
    chatml.encode_chat(msgs, kwargs={"enable_thinking": False})  # unknown to it: ignored
    with pytest.raises(GatewayError) as err:
        chatml.encode_chat(msgs, kwargs={"add_generation_prompt": False})
    assert err.value.param == "chat_template_kwargs"
