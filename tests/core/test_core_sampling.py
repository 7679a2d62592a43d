"""Sampling: validation, per-request seeds independent of batch-mates, top-k=1 == greedy."""

from __future__ import annotations

import pytest
import torch

from services.core.generate import generate
from services.core.model import MonolithicModel
from services.core.request import SamplingParams
from services.core.sampling import greedy_argmax, make_generator, sample
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
    got = sample(logits, params, [make_generator(p) for p in params])
    assert set(got.tolist()) == {0, 1}
    # top_p: softmax([4,3,2,1,0]) ~ [.64,.24,.09,...]: p=0.8 keeps the first two
    params = [SamplingParams(temperature=1.0, top_p=0.8, seed=i) for i in range(200)]
    got = sample(logits, params, [make_generator(p) for p in params])
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


def test_min_tokens_matches_transformers_min_new_tokens(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from services.core.demo import write_random_checkpoint

    d = write_random_checkpoint(tmp_path / "m", "mixtral", tokenizer=False, layers=2, hidden=64,
                                intermediate=64, experts=4, top_k=2, heads=4, kv_heads=2,
                                vocab=128)
    prompt = [5, 6, 7, 8]
    free = generate(MonolithicModel.from_pretrained(d), [prompt],
                    SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    eos = free[2]  # make the greedy third token the EOS: without min_tokens it stops there
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((d / name).read_text())
        cfg["eos_token_id"] = eos
        (d / name).write_text(json.dumps(cfg))
    model = MonolithicModel.from_pretrained(d)
    plain = generate(model, [prompt], SamplingParams(temperature=0, max_tokens=8))[0]
    assert plain[-1] == eos and len(plain) <= 3
    ours = generate(model, [prompt], SamplingParams(temperature=0, max_tokens=8, min_tokens=6))[0]
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8,
                          min_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert ours == ref[0, len(prompt):].tolist()
    assert len(ours) >= 6 and eos not in ours[:5]


def test_min_tokens_masks_stop_ids_and_eos_unless_ignored():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]]).repeat(3, 1)  # argmax 1, then 2
    params = [SamplingParams(temperature=0, max_tokens=4, min_tokens=2, stop_token_ids=(1,)),
              SamplingParams(temperature=0, max_tokens=4, min_tokens=2),
              SamplingParams(temperature=0, max_tokens=4, min_tokens=2, ignore_eos=True)]
    gens = [None] * 3
    # short of min_tokens: stop id 1 is masked (row 0), EOS 1 is masked (row 1) unless ignored
    assert sample(logits, params, gens, [1, 1, 1], eos_ids={1}).tolist() == [2, 2, 1]
    assert sample(logits, params, gens, [2, 2, 2], eos_ids={1}).tolist() == [1, 1, 1]
    assert logits[0, 1] == 5.0  # the caller's logits are not modified
    with pytest.raises(UserError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)


@pytest.mark.parametrize("vocab", [1024, 1000, 64, 32000])
def test_greedy_argmax_equals_torch_argmax(vocab):
    """The chunked CPU argmax picks exactly what torch.argmax picks: the first maximum, ties
    across and inside chunks, rows of -inf, NaN (counts as the max), a transposed view."""
    g = torch.Generator().manual_seed(vocab)
    for _ in range(20):
        x = torch.randn(37, vocab, generator=g)
        rows = torch.randint(0, 37, (8,), generator=g)
        x[rows, torch.randint(0, vocab, (8,), generator=g)] = 5.0  # ties at random places
        x[1, [3, vocab - 1]] = 9.0                                 # a tie across chunks
        x[2] = float("-inf")
        x[4, vocab // 2] = float("nan")
        assert torch.equal(greedy_argmax(x), torch.argmax(x, dim=-1))
    t = torch.randn(vocab, 5, generator=g).t()                     # non-contiguous rows
    assert torch.equal(greedy_argmax(t), torch.argmax(t, dim=-1))
    assert greedy_argmax(torch.empty(0, vocab)).shape == (0,)


def test_one_rows_numerics_never_fail_its_batch_mates():
    """A tiny temperature is greedy (dividing by it would overflow to inf), and a row whose
    logits are not finite keeps its argmax: the other rows still draw from their own seeds."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3)) * 10
    logits[3, 7] = float("nan")
    mates = SamplingParams(temperature=0.7, seed=2)
    params = [SamplingParams(temperature=1e-38, seed=1), mates,
              SamplingParams(temperature=1e-45, seed=1), SamplingParams(temperature=1.0, seed=4)]
    got = sample(logits, params, [make_generator(p) for p in params]).tolist()
    assert (got[0], got[2]) == (int(logits[0].argmax()), int(logits[2].argmax()))
    alone = sample(logits[1:2], [mates], [make_generator(mates)]).tolist()
    assert got[1] == alone[0]                      # unaffected by its batch-mates
    assert got[3] == 7                             # its argmax (NaN counts as the max)
