"""vLLM sampling parity through the gateway process with the official ``openai`` client on the
shared mesh: logprobs against transformers' log-softmax, penalties against the vLLM formula on
transformers' logits, logit_bias, min_p, bad_words, n / best_of, batched prompts, echo,
include_stop_str_in_output, continuous usage, structured outputs (llguidance) and tool calls,
and the same options through the gRPC front door."""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import jsonschema
import openai
import pytest
import torch
from metrics_helpers import scrape_metrics
from transformers import AutoModelForCausalLM, AutoTokenizer

from megascale.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

MODEL = "mixtral-gw"  # = conftest.MODEL_NAME
PROMPT = "The quick brown fox"

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def hf(gw_model_dir):
    tok = AutoTokenizer.from_pretrained(gw_model_dir)
    model = AutoModelForCausalLM.from_pretrained(gw_model_dir, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.http + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    """Next-token logits [V] after ``ids``."""
    with torch.no_grad():
        return hf[1](torch.tensor([ids])).logits[0, -1].float()


def test_completion_logprobs_match_transformers(client, hf):
    tok, _ = hf
    prompt_ids = tok.encode(PROMPT)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                  logprobs=3, extra_body={"return_token_ids": True})
    c = r.choices[0]
    ids = c.token_ids
    assert len(c.logprobs.token_logprobs) == len(ids) == len(c.logprobs.tokens)
    for i, t in enumerate(ids):
        ref = torch.log_softmax(hf_logits(hf, prompt_ids + ids[:i]), -1)
        assert abs(c.logprobs.token_logprobs[i] - ref[t].item()) < 1e-4
        top = c.logprobs.top_logprobs[i]
        assert len(top) <= 3
        best = ref.topk(3)
        # (two byte-level tokens may show as the same string: the dict keeps one of them)
        assert set(top) == {tok.decode([j], skip_special_tokens=False)
                            for j in best.indices.tolist()}
        assert all(min(abs(v - w) for w in best.values.tolist()) < 1e-4 for v in top.values())
        assert c.logprobs.token_logprobs[i] == pytest.approx(best.values[0].item(), abs=1e-4)
    assert c.logprobs.text_offset[0] == 0


def test_prompt_logprobs_and_echo_match_transformers(client, hf):
    tok, model = hf
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)  # [P, V]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 2})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for p in range(1, len(ids)):
        want = ref[p - 1]
        entry = plp[p][str(ids[p])]
        assert abs(entry["logprob"] - want[ids[p]].item()) < 1e-4
        assert entry["rank"] == int((want > want[ids[p]]).sum()) + 1
        top = want.topk(2)
        for rank, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist(),
                                          strict=True), 1):
            assert plp[p][str(t)]["rank"] == rank and abs(plp[p][str(t)]["logprob"] - v) < 1e-4
    echo = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                     echo=True, logprobs=1)
    lp = echo.choices[0].logprobs
    assert echo.choices[0].text.startswith(PROMPT)
    assert len(lp.tokens) == len(ids) + echo.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(
        [ref[p - 1, ids[p]].item() for p in range(1, len(ids))], abs=1e-4)
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1,
        stream=True) if c.choices and c.choices[0].logprobs]
    assert sum((s.tokens for s in streamed), []) == lp.tokens
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset


def test_chat_logprobs_stream_equals_non_stream(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hello there"}],
              max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    r = client.chat.completions.create(**kw)
    full = r.choices[0].logprobs.content
    assert len(full) == r.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-6
               for e in full)
    streamed = []
    for ch in client.chat.completions.create(**kw, stream=True):
        if ch.choices and ch.choices[0].logprobs is not None:
            streamed += ch.choices[0].logprobs.content
    assert [e.token for e in streamed] == [e.token for e in full]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in full], abs=1e-6)


def test_logit_bias_forces_and_bans(client, hf):
    forced = 300
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=1.0,
                                  seed=3, logit_bias={str(forced): 100},
                                  extra_body={"return_token_ids": True})
    assert r.choices[0].token_ids == [forced] * 4
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0,
                                       extra_body={"return_token_ids": True})
    top = greedy.choices[0].token_ids[0]
    banned = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0,
                                       logit_bias={str(top): -100},
                                       extra_body={"return_token_ids": True})
    ref = hf_logits(hf, hf[0].encode(PROMPT))
    ref[top] -= 100
    assert banned.choices[0].token_ids == [int(ref.argmax())]


def test_penalised_greedy_matches_the_vllm_formula_on_transformers_logits(client, hf):
    tok, _ = hf
    rep, freq, pres = 1.5, 0.75, 0.5  # exact in float32 (the wire width)
    text = "hello hello hello"  # on this checkpoint the penalties change its greedy output
    prompt = tok.encode(text)
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=8, temperature=0,
                                  frequency_penalty=freq, presence_penalty=pres,
                                  extra_body={"repetition_penalty": rep, "ignore_eos": True,
                                              "return_token_ids": True})
    out: list[int] = []
    for _ in range(8):
        logits = hf_logits(hf, prompt + out)
        counts = torch.bincount(torch.tensor(out, dtype=torch.long),
                                minlength=logits.numel()).float()
        seen = counts > 0
        seen[prompt] = True
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - freq * counts - pres * (counts > 0).float()
        out.append(int(logits.argmax()))
    assert r.choices[0].token_ids == out
    plain = client.completions.create(model=MODEL, prompt=text, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
    assert plain.choices[0].token_ids != out  # the penalties changed something


def test_min_p_one_sampling_is_greedy(client):
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    for seed in (1, 2):
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6,
                                      temperature=1.5, seed=seed, extra_body={"min_p": 1.0})
        assert r.choices[0].text == greedy.choices[0].text


def vllm_bad_words(tok, word: str) -> list[list[int]]:
    """vLLM's tokenization of one bad word: as is and, when it makes a new first token of the
    same length, with a leading space."""
    out: list[list[int]] = []
    for space in (False, True):
        ids = tok.encode((" " if space else "") + word.lstrip(), add_special_tokens=False)
        if not space or (ids[0] != out[-1][0] and len(ids) == len(out[-1])):
            out.append(ids)
    return out


def test_bad_words_are_never_generated(client, hf):
    tok, _ = hf
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                       extra_body={"return_token_ids": True, "ignore_eos": True})
    ids = greedy.choices[0].token_ids
    # the first greedy token that is a word vLLM's rule bans as itself
    at = next(i for i, t in enumerate(ids) if tok.decode([t]).strip().isalpha()
              and [t] in vllm_bad_words(tok, tok.decode([t])))
    word = tok.decode([ids[at]])
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"bad_words": [word], "return_token_ids": True,
                                              "ignore_eos": True})
    got = r.choices[0].token_ids
    assert got[:at] == ids[:at] and got[at] != ids[at]  # the same until the banned word
    for seq in vllm_bad_words(tok, word):
        assert not any(got[i:i + len(seq)] == seq for i in range(len(got)))


def test_n_choices_and_best_of(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=1.0,
                                  n=3, seed=5, extra_body={"return_token_ids": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == sum(len(c.token_ids) for c in r.choices)
    assert len({c.text for c in r.choices}) > 1  # independent draws (seed + i)
    b = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=1.0,
                                  n=1, best_of=3, seed=5)
    assert len(b.choices) == 1
    assert b.choices[0].text in {c.text for c in r.choices}  # the same three draws, ranked
    assert b.usage.completion_tokens > 4  # all three sequences count
    seen: dict[int, str] = {}
    finished = set()
    for ch in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, n=2,
            temperature=1.0, seed=9, stream=True):
        for c in ch.choices:
            seen[c.index] = seen.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1}


def _prefix_hits(stack) -> float:
    return sum(v for a in stack.mesh.attention
               for k, v in scrape_metrics(a.info["metrics_port"]).items()
               if k.startswith("megascale:prefix_cache_hits_total"))


def test_n_choices_share_the_prompt_kv(stack, client):
    """The n sequences of one prompt go to one replica (2 here) and prefill its full blocks
    once: the others wait a step and take them from the prefix cache (16-token blocks)."""
    prompt = torch.randint(3, 500, (70,), generator=torch.Generator().manual_seed(11)).tolist()
    before = _prefix_hits(stack)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                  n=4, extra_body={"return_token_ids": True})
    shared = _prefix_hits(stack) - before
    assert shared >= 3 * 64  # 4 full blocks of the 70-token prompt, computed once
    assert len({tuple(c.token_ids) for c in r.choices}) == 1  # greedy: the same choice 4x
    one = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                    extra_body={"return_token_ids": True})
    assert one.choices[0].token_ids == r.choices[0].token_ids


def test_batched_prompts_match_single_prompts(client):
    prompts = [PROMPT, "Once upon a time"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    for p, c in zip(prompts, r.choices, strict=True):
        one = client.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0)
        assert c.text == one.choices[0].text
    ids = client.completions.create(model=MODEL, prompt=[[1, 40, 41], [1, 50]], max_tokens=2,
                                    temperature=0)
    assert len(ids.choices) == 2


def test_echo_stop_string_inclusion_and_continuous_usage(client):
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    echo = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                     echo=True, extra_body={"ignore_eos": True})
    assert echo.choices[0].text == PROMPT + greedy
    stop = greedy[2:4]
    cut = greedy[: greedy.index(stop)]
    kept = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                     stop=[stop], extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == cut + stop
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    with_choice = [c for c in chunks if c.choices]
    assert all(c.usage is not None for c in with_choice)
    assert with_choice[-1].usage.completion_tokens == chunks[-1].usage.completion_tokens


SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                         "days": {"type": "integer", "minimum": 1, "maximum": 9},
                         "sunny": {"type": "boolean"}},
          "required": ["city", "days", "sunny"], "additionalProperties": False}


@pytest.mark.parametrize("seed", [0, 1])
def test_structured_outputs_follow_their_constraint(client, seed):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "weather?"}], max_tokens=40,
        temperature=1.0, seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    choices = ["apple pie", "banana", "cherry tart"]
    c = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=1.0,
                                  seed=seed, extra_body={"guided_choice": choices})
    assert c.choices[0].text in choices
    rx = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=1.0,
                                   seed=seed,
                                   extra_body={"structured_outputs": {"regex": r"[ab]{3}-\d\d"}})
    assert re.fullmatch(r"[ab]{3}-\d\d", rx.choices[0].text)
    js = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=1.0,
                                   seed=seed, extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(js.choices[0].text), SCHEMA)
    obj = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "json?"}], max_tokens=24,
        temperature=1.0, seed=seed, response_format={"type": "json_object"})
    out = obj.choices[0].message.content
    assert out.startswith("{")
    if obj.choices[0].finish_reason == "stop":  # else cut by max_tokens: a prefix of one
        assert isinstance(json.loads(out), dict)


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome"]},
        "unit": {"type": "string", "enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "noop", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": False}}}]


def test_tool_calls_named_required_and_streamed(client):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS,
                                       tool_choice=named, max_tokens=40, temperature=1.0,
                                       seed=1)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments),
                        TOOLS[0]["function"]["parameters"])
    req = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS,
                                         tool_choice="required", max_tokens=60,
                                         parallel_tool_calls=False, temperature=1.0, seed=2)
    assert req.choices[0].finish_reason == "tool_calls"
    (only,) = req.choices[0].message.tool_calls  # parallel_tool_calls=False: one call
    assert only.function.name in ("get_weather", "noop")
    json.loads(only.function.arguments)
    args, names = "", []
    for ch in client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS,
                                             tool_choice=named, max_tokens=40, temperature=1.0,
                                             seed=1, stream=True):
        for d in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            if d.function and d.function.name:
                names.append(d.function.name)
            args += (d.function.arguments or "") if d.function else ""
    assert names == ["get_weather"]
    assert json.loads(args) == json.loads(call.function.arguments)  # same seed, same call


def test_tool_choice_auto_answers_with_text_when_no_call_is_made(client):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=8,
                                       temperature=0)
    plain = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8,
                                           temperature=0)
    # this template does not show tools, and a random model writes no <tool_call>
    assert r.choices[0].message.content == plain.choices[0].message.content
    assert not r.choices[0].message.tool_calls
    streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model=MODEL, messages=msgs, tools=TOOLS, max_tokens=8, temperature=0, stream=True)
        if ch.choices)
    assert streamed == plain.choices[0].message.content


def test_grpc_front_door_offers_the_same_options(stack, hf):
    tok, _ = hf
    ids = tok.encode(PROMPT)

    async def run(sampling: common_pb2.SamplingParams, **kw
                  ) -> list[gateway_pb2.GatewayGenerateEvent]:
        async with grpc.aio.insecure_channel(stack.grpc) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            return [ev async for ev in stub.Generate(gateway_pb2.GatewayGenerateRequest(
                model=MODEL, token_ids=gateway_pb2.TokenIds(ids=ids), sampling=sampling, **kw))]

    events = asyncio.run(run(common_pb2.SamplingParams(
        temperature=0, max_tokens=3, logprobs=2, logit_bias={77: 100.0})))
    out = [t for ev in events for t in ev.token_ids]
    lps = [lp for ev in events for lp in ev.logprobs]
    assert out == [77, 77, 77] and len(lps) == 3
    ref = torch.log_softmax(hf_logits(hf, ids), -1)
    assert abs(lps[0].logprob - ref[77].item()) < 1e-4  # raw logprobs: before the bias
    assert list(lps[0].top_token_ids) == ref.topk(2).indices.tolist()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(run(common_pb2.SamplingParams(max_tokens=3, grammar="{not a grammar")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.grammar" in err.value.details()
    choices = ["red fox", "blue whale"]
    events = asyncio.run(run(common_pb2.SamplingParams(temperature=1.0, seed=4, max_tokens=20),
                             structured=gateway_pb2.StructuredOutput(
                                 choice=gateway_pb2.ChoiceList(choices=choices))))
    assert "".join(ev.text for ev in events) in choices
    greedy = asyncio.run(run(common_pb2.SamplingParams(temperature=0, max_tokens=6,
                                                       ignore_eos=True)))
    text = "".join(ev.text for ev in greedy)
    kept = asyncio.run(run(common_pb2.SamplingParams(temperature=0, max_tokens=6,
                                                     ignore_eos=True),
                           stop=[text[2:4]], include_stop_str_in_output=True))
    assert "".join(ev.text for ev in kept) == text[: text.index(text[2:4])] + text[2:4]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(run(common_pb2.SamplingParams(max_tokens=3),
                        structured=gateway_pb2.StructuredOutput(regex="[a")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "structured" in err.value.details()


def test_grpc_front_door_runs_n_and_best_of(stack, client):
    ids = [1, 40, 41, 42, 43]

    async def run(**kw) -> list[gateway_pb2.GatewayGenerateEvent]:
        async with grpc.aio.insecure_channel(stack.grpc) as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            return [ev async for ev in stub.Generate(gateway_pb2.GatewayGenerateRequest(
                model=MODEL, token_ids=gateway_pb2.TokenIds(ids=ids), include_usage=True,
                sampling=common_pb2.SamplingParams(temperature=1.0, seed=5, max_tokens=4,
                                                   ignore_eos=True), **kw))]

    events = asyncio.run(run(n=3, request_id="grpc-n"))
    got: dict[int, list[int]] = {}
    for ev in events:
        got.setdefault(ev.index, []).extend(ev.token_ids)
    finals = [ev for ev in events if ev.finish_reason]
    assert sorted(ev.index for ev in finals) == [0, 1, 2]  # one last event per choice
    assert all(ev.usage.completion_tokens == 4 for ev in finals)
    assert {ev.request_id for ev in events} == {"grpc-n-0", "grpc-n-1", "grpc-n-2"}
    rest = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=1.0,
                                     seed=5, n=3, extra_body={"return_token_ids": True,
                                                              "ignore_eos": True})
    assert [got[i] for i in range(3)] == [c.token_ids for c in rest.choices]  # seed + i each
    best = asyncio.run(run(n=1, best_of=3))
    assert len(best) == 1 and best[0].index == 0 and not best[0].logprobs
    assert list(best[0].token_ids) in list(got.values())
    for bad, field in ((dict(n=65), "n"), (dict(n=2, best_of=1), "best_of")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            asyncio.run(run(**bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()
