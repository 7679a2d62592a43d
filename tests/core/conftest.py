"""Fixtures for the model-core tests: small random checkpoints written by ``demo.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.core.demo import write_random_checkpoint

torch.set_num_threads(1)

# name -> write_random_checkpoint kwargs. Covers GQA and MQA (kv_heads=1), top-1 and top-2
# routing, Qwen3 dense (mlp_only) layers, head_dim != hidden/heads, tied embeddings.
CONFIGS: dict[str, dict] = {
    "mixtral": dict(family="mixtral", layers=3, hidden=64, intermediate=96, experts=6, top_k=2,
                    heads=4, kv_heads=2, vocab=512),
    "mixtral_mqa_top1": dict(family="mixtral", layers=2, hidden=64, intermediate=96, experts=4,
                             top_k=1, heads=4, kv_heads=1, vocab=512, seed=1),
    "qwen3_dense": dict(family="qwen3_moe", layers=3, hidden=64, intermediate=48, experts=6,
                        top_k=2, heads=4, kv_heads=2, head_dim=24, vocab=512,
                        dense_layers=(1,), norm_topk_prob=False, seed=2),
    "qwen3_mqa_top1_tied": dict(family="qwen3_moe", layers=2, hidden=64, intermediate=48,
                                experts=4, top_k=1, heads=4, kv_heads=1, vocab=512,
                                norm_topk_prob=True, tie_word_embeddings=True, seed=3),
}


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory: pytest.TempPathFactory):
    """Write (once per session) the checkpoint named in CONFIGS, or with explicit kwargs."""
    cache: dict[str, Path] = {}

    def make(name: str, **overrides) -> Path:
        key = name + repr(sorted(overrides.items()))
        if key not in cache:
            kwargs = {**CONFIGS[name], **overrides}
            family = kwargs.pop("family")
            out = tmp_path_factory.mktemp(name)
            cache[key] = write_random_checkpoint(out, family, tokenizer=False, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def mixtral_dir(ckpt_factory) -> Path:
    return ckpt_factory("mixtral")
