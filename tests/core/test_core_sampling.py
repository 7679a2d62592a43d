"""Sampling: validation, per-request seeds independent of batch-mates, top-k=1 == greedy."""

from __future__ import annotations

import pytest
import torch

from services.core.generate import generate
from services.core.model import MonolithicModel
from services.core.sampling import SamplingParams, sample
from services.errors import UserError


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
])
def test_invalid_params_rejected(kwargs, field):
    with pytest.raises(UserError, match=field):
        SamplingParams(**kwargs)


def test_filters_restrict_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(200, 1)
    params = [SamplingParams(temperature=1.0, top_k=2, seed=i) for i in range(200)]
    got = sample(logits, params, [p.make_generator() for p in params])
    assert set(got.tolist()) == {0, 1}
    # top_p: softmax([4,3,2,1,0]) ~ [.64,.24,.09,...]: p=0.8 keeps the first two
    params = [SamplingParams(temperature=1.0, top_p=0.8, seed=i) for i in range(200)]
    got = sample(logits, params, [p.make_generator() for p in params])
    assert set(got.tolist()) == {0, 1}


def test_seeded_request_reproducible_regardless_of_batch(mixtral_dir):
    model = MonolithicModel.from_pretrained(mixtral_dir)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16,
                            ignore_eos=True)
    other = SamplingParams(temperature=0.7, seed=99, max_tokens=16, ignore_eos=True)
    alone = generate(model, [[1, 2, 3]], seeded)[0]
    batched = generate(model, [[9, 9], [1, 2, 3], [5]], [other, seeded, other])[1]
    assert alone == batched
    assert generate(model, [[1, 2, 3]], SamplingParams(temperature=1.0, top_p=0.9, seed=4321,
                                                       max_tokens=16, ignore_eos=True))[0] != alone


def test_top_k_one_equals_greedy(mixtral_dir):
    model = MonolithicModel.from_pretrained(mixtral_dir)
    prompts = [[4, 5, 6], [7]]
    greedy = generate(model, prompts, SamplingParams(temperature=0, max_tokens=10,
                                                     ignore_eos=True))
    topk1 = generate(model, prompts, SamplingParams(temperature=1.3, top_k=1, max_tokens=10,
                                                    ignore_eos=True))
    assert greedy == topk1


def test_stop_tokens_end_generation(mixtral_dir):
    model = MonolithicModel.from_pretrained(mixtral_dir)
    full = generate(model, [[4, 5, 6]], SamplingParams(temperature=0, max_tokens=10,
                                                        ignore_eos=True))[0]
    stop = full[3]
    got = generate(model, [[4, 5, 6]], SamplingParams(temperature=0, max_tokens=10,
                                                       stop_token_ids=(stop,), ignore_eos=True))[0]
    assert got == full[: full.index(stop) + 1]
