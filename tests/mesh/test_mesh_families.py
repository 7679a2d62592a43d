"""`megascale up` serves Qwen2-MoE, OLMoE, GLM-4.5, DBRX, MiniMax-M2 and gpt-oss checkpoints
(transformers-written, with a real tokenizer) to the official openai client: greedy text equal
to transformers, several requests at once. One mesh per family, the shapes between them
covering 1x2 and 2x2 and m = 1 and 2: the attention replicas run attention, routers and the
shared experts (Qwen2's with its sigmoid gate), the expert nodes the routed experts."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from transformers import AutoTokenizer

from services.core.demo_families import write_family_checkpoint

NEW_TOKENS = 12
# family -> (writer kwargs: the tiny shapes of tests/conftest.py FAMILY_CONFIGS with 2 layers,
#            (attention replicas, expert nodes, micro-batches m))
CHECKPOINTS = {
    "qwen2_moe": (dict(layers=2, dense_layers=(1,), shared_intermediate=48, seed=41), (1, 2, 2)),
    "olmoe": (dict(layers=2, clip_qkv=1.5, seed=42), (2, 2, 1)),
    "glm4_moe": (dict(layers=2, dense_layers=(0,), head_dim=24, seed=43), (2, 2, 2)),
    "dbrx": (dict(layers=2, clip_qkv=1.5, top_k=3, seed=44), (1, 2, 1)),
    "minimax_m2": (dict(layers=2, head_dim=24, seed=45), (2, 2, 1)),
    "gpt_oss": (dict(layers=2, head_dim=16, sliding_window=8, swiglu_limit=1.0,
                     max_position=256, seed=46), (1, 2, 2)),
}
PROMPTS = ["The shared expert answered", "Routers pick", "A long day of tokens went by and"]


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def family_up(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"up-{family}")
    kwargs, (n_attn, n_exp, m) = CHECKPOINTS[family]
    model_dir = write_family_checkpoint(root / family, family, **kwargs)
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--model", str(model_dir), "--port", "0",
         "--attention", str(n_attn), "--experts", str(n_exp), "--micro-batches", str(m),
         "--workdir",
         str(root / "work"), "--quiet", "--max-batch-tokens", "128"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, lines = None, []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        lines.append(line)
        if m := re.search(r"megascale is up: (http://\S+/v1)", line):
            url = m.group(1)
        if url and "Ctrl-C stops everything" in line:
            break
    if url is None:
        proc.kill()
        pytest.fail(f"megascale up ({family}) did not come up:\n" + "".join(lines[-40:]))
    yield family, model_dir, openai.OpenAI(base_url=url, api_key="none", max_retries=0,
                                           timeout=120)
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def test_openai_completions_equal_transformers(family_up, hf_greedy):
    family, model_dir, client = family_up
    [model] = [m.id for m in client.models.list().data]
    tok = AutoTokenizer.from_pretrained(model_dir)

    def complete(prompt: str):
        return client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS,
                                         temperature=0, extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # at once: batched, over the replicas
        results = list(pool.map(complete, PROMPTS))
    for prompt, got in zip(PROMPTS, results, strict=True):
        ids = hf_greedy(model_dir, [tok.encode(prompt)], NEW_TOKENS)[0]
        assert got.choices[0].text == tok.decode(ids, skip_special_tokens=True), (family, prompt)
        assert got.usage.completion_tokens == NEW_TOKENS



def test_chat_uses_the_checkpoints_template(family_up, hf_greedy):
    """A chat request is rendered with the checkpoint's own template (harmony for gpt-oss,
    ChatML for the demo tokenizer of the others); the reply equals transformers on the same
    rendered prompt."""
    family, model_dir, client = family_up
    [model] = [m.id for m in client.models.list().data]
    tok = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "Hello"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if family == "gpt_oss":
        assert text == "<|start|>user<|message|>Hello<|end|><|start|>assistant"
    ids = tok.encode(text, add_special_tokens=False)
    want = tok.decode(hf_greedy(model_dir, [ids], NEW_TOKENS)[0], skip_special_tokens=True)
    got = client.chat.completions.create(model=model, messages=messages, max_tokens=NEW_TOKENS,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert got.choices[0].message.content == want, family
