"""`megascale up` serves a DeepSeek-V2 checkpoint (transformers-written: softmax
group-limited routing, no q_lora, two shared experts, a dense first layer, YaRN; with a real
tokenizer) on 1 attention replica (m = 1) x 2 expert nodes to the official openai client:
greedy text equal to transformers, streaming chat. (V3 crosses a 2x2 m = 2 mesh in
tests/engine/test_engine_deepseek.py.)"""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer
from up_launch import start_up, stop_up

from services.core.demo_deepseek import write_deepseek_checkpoint

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def ds_up(tmp_path_factory):
    root = tmp_path_factory.mktemp("up-deepseek")
    model_dir = write_deepseek_checkpoint(
        root / "deepseek-v2", "deepseek_v2", layers=3, dense_layers=1, max_position=256,
        topk_method="group_limited_greedy", q_lora_rank=None, shared_experts=2,
        routed_scaling_factor=1.0, seed=22,
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                          mscale=0.707, mscale_all_dim=0.707))
    proc, url, _ = start_up(["--model", str(model_dir), "--port", "0", "--attention", "1",
                             "--experts", "2", "--micro-batches", "1", "--workdir",
                             str(root / "work"), "--quiet", "--max-batch-tokens", "128"])
    yield model_dir, openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    stop_up(proc)


def test_openai_completion_equals_transformers(ds_up, hf_greedy):
    model_dir, client = ds_up
    [model] = [m.id for m in client.models.list().data]
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = "The latent experts answered"
    ids = tok.encode(prompt)
    want = tok.decode(hf_greedy(model_dir, [ids], NEW_TOKENS)[0], skip_special_tokens=True)
    got = client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert got.choices[0].text == want
    assert got.usage.completion_tokens == NEW_TOKENS


def test_openai_streaming_chat(ds_up):
    _, client = ds_up
    [model] = [m.id for m in client.models.list().data]
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 8
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
