"""``megascale up`` with its own layout choice on this CPU host: colocated (one replica that
computes its experts in-process), said so in the banner, token-exact through the official
openai client, and no expert node started."""

from __future__ import annotations

import openai
from transformers import AutoTokenizer
from up_launch import start_up, stop_up

from services.core.demo import write_random_checkpoint

NEW_TOKENS = 12


def test_up_picks_colocated_here_and_stays_token_exact(tmp_path, hf_greedy):
    model = write_random_checkpoint(tmp_path / "moe", "mixtral", layers=2, hidden=64,
                                    intermediate=96, experts=8, top_k=2, heads=4, kv_heads=2,
                                    vocab=512, max_position=256, seed=5)
    workdir = tmp_path / "work"
    proc, url, banner = start_up(["--model", str(model), "--port", "0", "--workdir",
                                  str(workdir), "--quiet", "--device", "cpu"])
    try:
        assert "layout: colocated" in banner and "--layout disaggregated" in banner, banner
        roles = sorted(p.name.removesuffix(".ready.json") for p in workdir.glob("*.ready.json"))
        assert roles == ["attention-0", "gateway", "scheduler"], roles

        tok = AutoTokenizer.from_pretrained(model)
        prompts = ["The experts answered", "Colocated replicas"]
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        for prompt in prompts:
            ids = tok.encode(prompt)
            want = tok.decode(hf_greedy(model, [ids], NEW_TOKENS)[0], skip_special_tokens=True)
            got = client.completions.create(model=model.name, prompt=prompt,
                                            max_tokens=NEW_TOKENS, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert got.choices[0].text == want
    finally:
        code = stop_up(proc)
    assert code == 0
