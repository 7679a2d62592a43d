"""The elastic pool's flags: an expert node with --experts auto needs a scheduler; a replica
without --expert-nodes needs one too (one-line errors naming the flag)."""

from __future__ import annotations

import argparse

import pytest

from services.attention import main as attention_main
from services.errors import ConfigError
from services.expert import main as expert_main


def _args(module, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


def test_an_elastic_expert_node_needs_a_scheduler(engine_ckpt):
    args = _args(expert_main, ["--model", str(engine_ckpt("mixtral")), "--experts", "auto"])
    with pytest.raises(ConfigError, match="--experts auto needs --scheduler"):
        expert_main.build(args)
    args = _args(expert_main, ["--model", str(engine_ckpt("mixtral")), "--experts", "auto",
                               "--scheduler", "127.0.0.1:9", "--node-id", "pool-3"])
    cfg = expert_main.build(args)
    assert cfg.elastic and cfg.expert_ids == () and cfg.m2n_sender_id > 1 << 16
    again = expert_main.build(args)
    assert again.m2n_sender_id == cfg.m2n_sender_id  # stable across restarts (node id hash)


def test_a_replica_without_expert_nodes_needs_a_scheduler(engine_ckpt):
    args = _args(attention_main, ["--model", str(engine_ckpt("mixtral"))])
    with pytest.raises(ConfigError, match="expert_nodes"):
        attention_main.build(args)
    args = _args(attention_main, ["--model", str(engine_ckpt("mixtral")), "--scheduler",
                                  "127.0.0.1:9", "--expert-wait", "5"])
    cfg = attention_main.build(args)
    assert cfg.expert_nodes == () and cfg.expert_wait_s == 5
