"""SamplingParams' new fields (validation, wire round trip) and the per-row logits processors
against a per-row reference written from vLLM's formulas; grammar masks (llguidance)."""

from __future__ import annotations

import json

import pytest
import torch

from services.core.demo import write_random_checkpoint
from services.core.logits_processors import logprobs, process
from services.core.request import (
    InvalidField,
    SamplingParams,
    sampling_from_proto,
    sampling_to_proto,
)
from services.core.sampling import sample
from services.core.structured import GrammarCompiler, compile_grammar

torch.set_num_threads(1)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 3.0}, "repetition_penalty"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": True}, "min_p"),
    ({"logit_bias": ((1, 101.0),)}, "logit_bias"),
    ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
    ({"logit_bias": ((1, 1.0), (1, 2.0))}, "logit_bias"),
    ({"logit_bias": tuple((i, 1.0) for i in range(301))}, "logit_bias"),
    ({"bad_words_ids": ((),)}, "bad_words"),
    ({"bad_words_ids": (tuple(range(17)),)}, "bad_words"),
    ({"bad_words_ids": ((1, -2),)}, "bad_words"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"grammar": ""}, "grammar"),
    ({"grammar": "g", "min_tokens": 1}, "min_tokens"),
    ({"grammar": "g", "ignore_eos": True}, "ignore_eos"),
])
def test_new_fields_are_validated(kwargs, field):
    with pytest.raises(InvalidField) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field and str(err.value).startswith(field.split("_ids")[0])


def test_new_fields_round_trip_the_wire():
    s = SamplingParams(presence_penalty=0.5, frequency_penalty=-0.25, repetition_penalty=1.5,
                       min_p=0.125, logit_bias=((3, 100.0), (9, -5.5)),
                       bad_words_ids=((1, 2), (7,)), logprobs=0, grammar='{"grammars": []}',
                       prompt_logprobs=3)
    assert sampling_from_proto(sampling_to_proto(s)) == s
    assert s.penalized and not SamplingParams().penalized
    assert sampling_from_proto(sampling_to_proto(SamplingParams())) == SamplingParams()


def _reference(logits: torch.Tensor, p: SamplingParams, prompt: list[int], out: list[int]
               ) -> torch.Tensor:
    """One row, written out token by token from vLLM's sampler."""
    x = logits.clone()
    for word in p.bad_words_ids:
        if len(word) == 1 or out[-(len(word) - 1):] == list(word[:-1]):
            x[word[-1]] = float("-inf")
    for t, b in p.logit_bias:
        x[t] += b
    for t in range(x.numel()):
        if t in prompt or t in out:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        c = out.count(t)
        x[t] -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
    return x


def test_processors_match_the_per_row_reference():
    g = torch.Generator().manual_seed(0)
    V = 40
    logits = torch.randn(4, V, generator=g) * 3
    params = [SamplingParams(),
              SamplingParams(repetition_penalty=1.7, frequency_penalty=0.5,
                             presence_penalty=-0.25),
              SamplingParams(logit_bias=((5, 10.0), (6, -3.0)), bad_words_ids=((9, 4), (11,))),
              SamplingParams(repetition_penalty=0.5, bad_words_ids=((2, 3, 8),))]
    prompts = [[1, 2], [3, 4, 5], [6], [7, 7, 2]]
    outputs = [[1], [4, 4, 9, 30], [9], [2, 3]]
    got = process(logits, params, prompts, outputs)
    for i, p in enumerate(params):
        torch.testing.assert_close(got[i], _reference(logits[i], p, prompts[i], outputs[i]))
    assert got[2, 4] == float("-inf") and got[2, 11] == float("-inf")  # after [9]: 4 banned
    assert got[3, 8] == float("-inf")


def test_a_batch_without_processors_is_untouched():
    logits = torch.randn(3, 16)
    assert process(logits, [SamplingParams()] * 3, [[1]] * 3, [[2]] * 3) is logits


def test_min_p_and_logprobs():
    logits = torch.tensor([[2.0, 1.9, -5.0, 0.0]])
    p = SamplingParams(temperature=1.0, min_p=0.5, seed=1)
    seen = {int(sample(logits, [p], [torch.Generator().manual_seed(s)])[0]) for s in range(40)}
    assert seen == {0, 1}  # 2 and 3 are below half the top probability
    lp = logprobs(logits, torch.tensor([1]), [2])[0]
    ref = torch.log_softmax(logits[0], -1)
    assert lp.logprob == pytest.approx(ref[1].item()) and lp.top_ids == (0, 1)
    assert logprobs(logits, torch.tensor([1]), [None]) == [None]


@pytest.fixture(scope="module")
def compiler(tmp_path_factory):
    from transformers import AutoTokenizer

    d = write_random_checkpoint(tmp_path_factory.mktemp("g") / "m", "mixtral", layers=1,
                                hidden=32, intermediate=32, experts=4, top_k=2, heads=2,
                                kv_heads=1, vocab=512, max_position=64, seed=1)
    tok = AutoTokenizer.from_pretrained(d)
    return tok, GrammarCompiler(tok, 520, [tok.eos_token_id])  # logits wider than the vocab


def test_grammar_masks_drive_a_random_walk_to_a_match(compiler):
    tok, gc = compiler
    grammar = compile_grammar("regex", r"(yes|no)-[0-9]{2}", "guided_regex")
    for seed in range(3):
        m = gc.request(grammar)
        g = torch.Generator().manual_seed(seed)
        out: list[int] = []
        while True:
            allowed = gc.allowed([m, None], "cpu")
            assert allowed.shape == (2, 520) and bool(allowed[1].all())
            assert not allowed[0, 512:].any()
            t = int(sample(torch.randn(1, 520, generator=g), [SamplingParams(seed=seed)],
                           [g], allowed=allowed[:1])[0])
            if t == tok.eos_token_id:
                break
            out.append(t)
            m.advance(t)
        text = tok.decode(out)
        assert text[:-3] in ("yes", "no") and text[-3] == "-" and text[-2:].isdigit(), text


def test_grammars_refuse_bad_specs(compiler):
    _, gc = compiler
    for kind, spec in (("regex", "[a"), ("choice", []), ("json_schema", "{x"),
                       ("json_schema", [1]), ("grammar", "start: undefined_rule")):
        with pytest.raises(InvalidField) as err:
            gc.check(compile_grammar(kind, spec, "f"), "f")
        assert err.value.field == "f"
    gc.check(compile_grammar("json_schema", json.dumps({"type": "object"}), "f"))
