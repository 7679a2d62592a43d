"""Fixtures for the disaggregated engine tests: small demo checkpoints of both families."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.demo import write_random_checkpoint

CHECKPOINTS = {
    "mixtral": dict(family="mixtral", layers=3, hidden=64, intermediate=96, experts=8, top_k=2,
                    heads=4, kv_heads=2, vocab=512, seed=11),
    "qwen3_moe": dict(family="qwen3_moe", layers=3, hidden=64, intermediate=48, experts=8,
                      top_k=2, heads=4, kv_heads=1, head_dim=24, vocab=512, dense_layers=(1,),
                      norm_topk_prob=True, seed=12),
}


@pytest.fixture(scope="session")
def engine_ckpt(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            kw = dict(CHECKPOINTS[name])
            family = kw.pop("family")
            cache[name] = write_random_checkpoint(tmp_path_factory.mktemp(name), family,
                                                  tokenizer=False, **kw)
        return cache[name]

    return make
