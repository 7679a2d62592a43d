"""The real CLI (`python -m services.cli`) in subprocesses: success and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.core.generate import generate
from services.core.model import MonolithicModel
from services.core.request import SamplingParams

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MEGASCALE_TORCH_THREADS": "1"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=ENV)


def test_demo_model_then_generate_json(tmp_path):
    out = tmp_path / "m"
    r = cli("demo-model", "--family", "qwen3_moe", "--out", out, "--layers", "2", "--hidden",
            "64", "--intermediate", "32", "--experts", "4", "--vocab", "300",
            "--dense-layers", "0")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["mlp_only_layers"] == [0]
    r = cli("generate", "--model", out, "--prompt-ids", "1,2,3", "--prompt-ids", "7",
            "--max-tokens", "5", "--ignore-eos", "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["index"] for x in lines] == [0, 1]
    model = MonolithicModel.from_pretrained(out)
    want = generate(model, [[1, 2, 3], [7]], SamplingParams(temperature=0, max_tokens=5,
                                                            ignore_eos=True))
    assert [x["token_ids"] for x in lines] == want
    has_tok = (out / "tokenizer.json").is_file()
    assert all((x["text"] is None) != has_tok for x in lines)


def _broken(src, dst, edit=None, config=None):
    shutil.copytree(src, dst)
    if edit is not None:
        t = load_file(str(src / "model.safetensors"))
        edit(t)
        save_file(t, str(dst / "model.safetensors"))
    if config is not None:
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("case, expect", [
    ("missing_tensor", "missing tensor 'model.layers.0.self_attn.q_proj.weight'"),
    ("wrong_shape", "'model.embed_tokens.weight' has shape"),
    ("unknown_arch", "architectures: unsupported ['LlamaForCausalLM']"),
    ("hidden_not_divisible", "hidden_size (64) must be divisible by num_attention_heads (3)"),
    ("prompt_too_long", "exceed max_position_embeddings (4096)"),
    ("no_tokenizer", "--prompt needs"),
])
def test_bad_input_is_one_line_error(mixtral_dir, tmp_path, case, expect):
    d, prompt = mixtral_dir, ["--prompt-ids", "1,2,3"]
    if case == "missing_tensor":
        d = _broken(mixtral_dir, tmp_path / case,
                    edit=lambda t: t.pop("model.layers.0.self_attn.q_proj.weight"))
    elif case == "wrong_shape":
        d = _broken(mixtral_dir, tmp_path / case,
                    edit=lambda t: t.update({"model.embed_tokens.weight": torch.zeros(4, 4)}))
    elif case == "unknown_arch":
        d = _broken(mixtral_dir, tmp_path / case, config={"architectures": ["LlamaForCausalLM"]})
    elif case == "hidden_not_divisible":
        d = _broken(mixtral_dir, tmp_path / case,
                    config={"num_attention_heads": 3, "head_dim": None})
    elif case == "prompt_too_long":
        prompt = ["--prompt-ids", ",".join(["5"] * 4090), "--max-tokens", "10"]
    elif case == "no_tokenizer":
        prompt = ["--prompt", "hello"]
    r = cli("generate", "--model", d, *prompt)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert expect in lines[0]
