"""Fixtures shared by every test area: thread limits, free ports, a real redis-server.

Area-specific fixtures live in each area's own conftest (tests/<area>/conftest.py).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# Two cores are shared by the test process and the servers it starts: keep every torch process
# (children inherit these) at one thread so they do not fight.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MEGASCALE_TORCH_THREADS", "1")

try:  # torch is heavy; only configure it when installed
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on loopback for the whole session (skips when not installed)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (scripts/setup.sh installs it)")
    port = free_port()
    workdir: Path = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start within 10 s")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def hf_greedy():
    """``hf_greedy(model_dir, prompts, new_tokens, device="cpu")`` -> greedy token ids from
    Hugging Face ``transformers`` (float32, one prompt at a time, EOS ignored): the outside
    referee."""
    import torch
    from transformers import AutoModelForCausalLM

    models: dict[tuple[str, str], object] = {}
    results: dict[tuple, list[int]] = {}

    def run(model_dir: str | Path, prompts: list[list[int]], new_tokens: int,
            device: str = "cpu") -> list[list[int]]:
        key = (str(model_dir), device)
        if key not in models:
            m = AutoModelForCausalLM.from_pretrained(key[0], dtype=torch.float32).eval()
            m.generation_config.eos_token_id = None
            models[key] = m.to(device)
        out = []
        for p in prompts:
            rk = (key, tuple(p), new_tokens)
            if rk not in results:
                with torch.no_grad():
                    ids = models[key].generate(torch.tensor([p], device=device),
                                               do_sample=False, max_new_tokens=new_tokens,
                                               min_new_tokens=new_tokens)
                results[rk] = ids[0, len(p):].tolist()
            out.append(results[rk])
        return out

    return run


# DeepSeek checkpoints written by transformers itself (services/core/demo_deepseek.py); each is
# written once per session and shared by tests/core, tests/engine and tests/mesh.
DEEPSEEK_CONFIGS: dict[str, dict] = {
    # V3: sigmoid + e_score_correction_bias, 4 groups (top-2 of them), shared expert, a dense
    # first layer, q_lora, interleaved RoPE, routed_scaling_factor 2.5
    "v3": dict(family="deepseek_v3", layers=3, dense_layers=1, experts=8, top_k=2, n_group=4,
               topk_group=2, shared_experts=1, q_lora_rank=48, seed=0),
    # V2: softmax group_limited_greedy, no q_lora (V2-Lite), 2 shared experts, YaRN with mscale
    "v2": dict(family="deepseek_v2", layers=3, dense_layers=1, experts=8, top_k=2, n_group=4,
               topk_group=2, topk_method="group_limited_greedy", shared_experts=2,
               q_lora_rank=None, routed_scaling_factor=1.0, seed=22,
               rope_scaling=dict(rope_type="yarn", factor=4.0,
                                 original_max_position_embeddings=64, mscale=0.707,
                                 mscale_all_dim=0.707)),
}


@pytest.fixture(scope="session")
def deepseek_ckpt(tmp_path_factory: pytest.TempPathFactory):
    """``deepseek_ckpt(name, **overrides)`` -> directory of the DEEPSEEK_CONFIGS checkpoint."""
    from services.core.demo_deepseek import write_deepseek_checkpoint

    cache: dict[str, Path] = {}

    def make(name: str, **overrides) -> Path:
        key = name + repr(sorted(overrides.items()))
        if key not in cache:
            kwargs = {**DEEPSEEK_CONFIGS[name], **overrides}
            family = kwargs.pop("family")
            out = tmp_path_factory.mktemp(f"deepseek-{name}")
            kwargs.setdefault("tokenizer", False)
            cache[key] = write_deepseek_checkpoint(out, family, **kwargs)
        return cache[key]

    return make


# Qwen2-MoE / OLMoE / GLM-4.5 / DBRX / MiniMax-M2 / gpt-oss checkpoints written by transformers
# itself (services/core/demo_families.py), shared by tests/core, tests/planner and tests/mesh.
FAMILY_CONFIGS: dict[str, dict] = {
    # shared expert (48 wide) with its sigmoid gate, a dense (mlp_only) layer, q/k/v biases
    "qwen2_moe": dict(family="qwen2_moe", layers=3, dense_layers=(1,), shared_intermediate=48,
                      kv_heads=2, seed=31),
    # full-width q/k norm, clip_qkv clamping, biases on all four projections, no renorm
    "olmoe": dict(family="olmoe", layers=2, kv_heads=2, clip_qkv=1.5, seed=32),
    # sigmoid + selection-bias routing, shared expert, a dense first layer, per-head q/k norm,
    # partial rotary (half of head_dim 24), q/k/v biases, routed_scaling_factor 2.5
    "glm4_moe": dict(family="glm4_moe", layers=3, dense_layers=(0,), head_dim=24,
                     routed_scaling_factor=2.5, seed=33),
    # nested attn/ffn config, fused Wqkv with clip_qkv, LayerNorm, top-3 weights / their 1-norm
    "dbrx": dict(family="dbrx", layers=2, kv_heads=2, clip_qkv=1.5, top_k=3, seed=34),
    # full-width q/k norm, partial rotary (12 of head_dim 24), sigmoid + selection bias
    "minimax_m2": dict(family="minimax_m2", layers=2, kv_heads=2, head_dim=24, seed=35),
    # a sliding (window 8) and a full layer, sinks, biases everywhere, top-k-logit softmax
    # routing, clamped SwiGLU with a limit low enough to clamp, YaRN
    "gpt_oss": dict(family="gpt_oss", layers=2, kv_heads=2, head_dim=16, sliding_window=8,
                    swiglu_limit=1.0, max_position=256, seed=36),
}


@pytest.fixture(scope="session")
def family_ckpt(tmp_path_factory: pytest.TempPathFactory):
    """``family_ckpt(name, **overrides)`` -> directory of the FAMILY_CONFIGS checkpoint."""
    from services.core.demo_families import write_family_checkpoint

    cache: dict[str, Path] = {}

    def make(name: str, **overrides) -> Path:
        key = name + repr(sorted(overrides.items()))
        if key not in cache:
            kwargs = {**FAMILY_CONFIGS[name], **overrides}
            family = kwargs.pop("family")
            kwargs.setdefault("tokenizer", False)
            cache[key] = write_family_checkpoint(tmp_path_factory.mktemp(f"family-{name}"),
                                                 family, **kwargs)
        return cache[key]

    return make
