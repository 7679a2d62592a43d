"""Fixtures for the disaggregated engine tests: small demo checkpoints of both families."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.demo import write_random_checkpoint
from services.launch.procs import RoleProcess, spawn_role

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


@pytest.fixture(scope="module")
def lone_expert(engine_ckpt, tmp_path_factory):
    """``lone_expert(experts, name)`` starts one expert node process on the mixtral checkpoint
    hosting ``experts`` (a ``--experts`` spec such as "0-3"); all are stopped with the module."""
    nodes = []

    def start(experts: str, name: str) -> RoleProcess:
        node = spawn_role("expert", ["--model", str(engine_ckpt("mixtral")), "--experts",
                                     experts], name, tmp_path_factory.mktemp(name))
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()
