"""Expert failover: a replica routes around an expert node that dies or hangs, re-sending the
rows that node owed to other replicas of the same experts, and the output stays exactly the
greedy tokens transformers produces. Routing itself is checked as a pure function."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
import torch
from engine_helpers import grpc_generate
from metrics_helpers import scrape_metrics

from megascale.v1 import attention_pb2, attention_pb2_grpc, common_pb2, expert_pb2, expert_pb2_grpc
from services.attention.config import AttentionConfig
from services.attention.routing import ExpertNodeRoute, ExpertUnavailable, Placement, Routes
from services.errors import ConfigError
from services.launch.procs import LocalMesh, RoleProcess

ALL = list(range(8))
PROMPT = [5, 6, 7, 8, 9, 10, 11]
LONG = 160  # tokens of the request that is running when the node fails


def _placement(*hosted: tuple[int, ...]) -> Placement:
    return Placement(1, tuple(ExpertNodeRoute(f"n{i}", f"tcp://127.0.0.1:{9000 + i}", ids)
                              for i, ids in enumerate(hosted)), num_experts=4)


@pytest.mark.parametrize("down", [{}, {1: "test"}, {0: "test", 2: "test"}])
def test_routes_send_each_routed_pair_to_one_live_replica(down):
    p = _placement((0, 1, 2, 3), (0, 1), (2, 3))
    routes = Routes(p, down)
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(40)])
    ids[::7, 1] = -1  # a re-sent part: some pairs are already served elsewhere
    weights = torch.rand(40, 2, generator=g)
    if 0 in down:  # experts 0 and 1 now live on node 1 only
        with pytest.raises(ExpertUnavailable, match=r"experts \[2, 3\] have no live replica.*n2"):
            routes.split(ids, weights, partial=True)
        ids = torch.where(ids >= 2, -1, ids)
    weights = torch.where(ids >= 0, weights, 0.0)  # a Part's invariant
    served = torch.zeros(40, 2, dtype=torch.int64)
    for ni, row_ids, part_ids, part_w in routes.split(ids, weights, partial=True):
        assert ni not in down
        rows = torch.arange(40) if row_ids is None else row_ids
        mine = part_ids >= 0
        if row_ids is not None:  # (one live node is sent every row as is)
            assert mine.any(dim=1).all(), "a node is sent a row with nothing to compute"
        hosted = torch.tensor(p.nodes[ni].expert_ids)
        assert torch.isin(part_ids[mine], hosted).all(), "routed to a node without the expert"
        assert torch.equal(part_w[mine], weights[rows][mine])
        assert (part_w[~mine] == 0).all()
        served[rows] += mine.long()
    assert torch.equal(served, (ids >= 0).long()), "a pair served twice or not at all"


def _reported_down(address: str) -> list[str]:
    """The expert nodes the replica's load report (what it heartbeats) names as down."""
    with grpc.insecure_channel(address) as ch:
        return list(attention_pb2_grpc.AttentionStub(ch).GetLoad(
            attention_pb2.GetLoadRequest(), timeout=10).expert_nodes_down)


def _stream_across(address: str, fault) -> list[int]:
    """Generate LONG tokens for PROMPT, calling ``fault()`` once the stream has started."""
    with grpc.insecure_channel(address) as ch:
        stream = attention_pb2_grpc.AttentionStub(ch).Generate(
            attention_pb2.GenerateRequest(
                request_id="running", prompt_token_ids=PROMPT,
                sampling=common_pb2.SamplingParams(temperature=0, max_tokens=LONG,
                                                   ignore_eos=True)),
            timeout=120)
        tokens: list[int] = []
        final = None
        for ev in stream:
            if not tokens:
                fault()
            tokens.extend(ev.token_ids)
            final = ev
    assert final.error_message == "" and final.finish_reason == common_pb2.FINISH_REASON_LENGTH
    return tokens


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_killed_replicated_node_fails_over_with_exact_tokens(engine_ckpt, hf_greedy, tmp_path,
                                                             transport):
    path = engine_ckpt("mixtral")
    with LocalMesh.start(path, [ALL, ALL], micro_batches=2, transport=transport,
                         attention_args=["--metrics-port", "0", "--block-size", "4"],
                         workdir=tmp_path) as mesh:
        replica = mesh.attention[0]
        got = _stream_across(replica.grpc, mesh.experts[1].kill)
        after = grpc_generate(replica.grpc, "after", [300, 301], 24)  # routed around at once
        assert after.final.error_message == ""
        m = scrape_metrics(replica.info["metrics_port"])
        assert _reported_down(replica.grpc) == [mesh.experts[1].info["node_id"]]
    want_long, want_after = hf_greedy(path, [PROMPT, [300, 301]], LONG)
    assert got == want_long
    assert after.tokens == want_after[:24]
    assert m["megascale:expert_failovers_total"] >= 1
    assert m["megascale:expert_nodes_down"] == 1


def _received(expert: RoleProcess) -> int:
    with grpc.insecure_channel(expert.grpc) as ch:
        return expert_pb2_grpc.ExpertStub(ch).GetStats(expert_pb2.GetStatsRequest(),
                                                       timeout=10).messages_received


def test_hung_node_is_routed_around_then_readmitted(engine_ckpt, hf_greedy, tmp_path):
    path = engine_ckpt("qwen3_moe")
    with LocalMesh.start(path, [ALL, [0, 1, 2, 3], [4, 5, 6, 7]], micro_batches=2,
                         attention_args=["--expert-timeout", "1.5", "--expert-readmit", "3",
                                         "--metrics-port", "0"],
                         workdir=tmp_path) as mesh:
        replica, hung = mesh.attention[0], mesh.experts[1]
        resumed = threading.Timer(4.0, os.kill, (hung.proc.pid, signal.SIGCONT))
        try:
            def freeze() -> None:
                os.kill(hung.proc.pid, signal.SIGSTOP)
                resumed.start()  # the node wakes up later and answers what it was sent

            got = _stream_across(replica.grpc, freeze)
        finally:
            resumed.cancel()
            os.kill(hung.proc.pid, signal.SIGCONT)
        resumed.join()
        time.sleep(0.5)  # the woken node's replies reach the replica; the next request reads them
        after = grpc_generate(replica.grpc, "after", [300, 301], 24)
        down = scrape_metrics(replica.info["metrics_port"])
        time.sleep(3.5)  # past --expert-readmit: the healthy link is taken back
        seen = _received(hung)
        again = grpc_generate(replica.grpc, "again", [300, 301], 24)
        back = scrape_metrics(replica.info["metrics_port"])
        assert _reported_down(replica.grpc) == []
        assert _received(hung) > seen, "the re-admitted node gets traffic again"
        assert all(e.alive() for e in mesh.experts)
    want_long, want_after = hf_greedy(path, [PROMPT, [300, 301]], LONG)
    assert got == want_long
    assert after.final.error_message == "" and after.tokens == want_after[:24]
    assert again.final.error_message == "" and again.tokens == want_after[:24]
    assert down["megascale:expert_failovers_total"] >= 1
    assert down["megascale:expert_replies_dropped_total"] >= 1  # the woken node's late answers
    assert back["megascale:expert_nodes_down"] == 0


@pytest.mark.parametrize("field,value", [("expert_timeout_s", 0.0),
                                         ("expert_readmit_s", -1.0)])
def test_failover_settings_are_validated(engine_ckpt, field, value):
    with pytest.raises(ConfigError, match=field):
        AttentionConfig(model_dir=engine_ckpt("mixtral"), expert_nodes=("127.0.0.1:1",),
                        **{field: value})
