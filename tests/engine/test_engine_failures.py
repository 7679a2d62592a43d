"""Aborts, KV pool limits and failures across real attention / expert processes."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import grpc
import pytest
import torch
from engine_helpers import grpc_generate
from safetensors.torch import load_file, save_file

import libm2n
from megascale.v1 import (
    attention_pb2,
    attention_pb2_grpc,
    common_pb2,
    expert_pb2,
    expert_pb2_grpc,
)
from services.core import moe_wire
from services.core.model import ExpertSide
from services.launch.procs import LocalMesh

NUM_BLOCKS, BLOCK_SIZE = 4, 4  # a 16-token KV pool: one request at a time


@pytest.fixture(scope="module")
def small_pool_mesh(engine_ckpt, tmp_path_factory):
    with LocalMesh.start(engine_ckpt("mixtral"), [list(range(8))], micro_batches=2,
                         attention_args=["--num-blocks", str(NUM_BLOCKS), "--block-size",
                                         str(BLOCK_SIZE)],
                         workdir=tmp_path_factory.mktemp("small-pool")) as mesh:
        yield mesh


def free_blocks(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return attention_pb2_grpc.AttentionStub(ch).GetLoad(attention_pb2.GetLoadRequest(),
                                                            timeout=10).free_kv_blocks


def wait_free_blocks(address: str, want: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    got = free_blocks(address)
    while got != want and time.monotonic() < deadline:
        time.sleep(0.05)
        got = free_blocks(address)
    return got


def test_abort_mid_generation_frees_kv_blocks(small_pool_mesh):
    address = small_pool_mesh.attention[0].grpc
    assert free_blocks(address) == NUM_BLOCKS
    with grpc.insecure_channel(address) as ch:
        stub = attention_pb2_grpc.AttentionStub(ch)
        stream = stub.Generate(attention_pb2.GenerateRequest(
            request_id="to-abort", prompt_token_ids=[1, 2],
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)),
            timeout=60)
        events = [next(stream) for _ in range(2)]
        assert all(e.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for e in events)
        assert free_blocks(address) < NUM_BLOCKS
        assert stub.Abort(attention_pb2.AbortRequest(request_id="to-abort")).found
        last = list(stream)[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_ABORT
    assert wait_free_blocks(address, NUM_BLOCKS) == NUM_BLOCKS
    with grpc.insecure_channel(address) as ch:
        stub = attention_pb2_grpc.AttentionStub(ch)
        assert not stub.Abort(attention_pb2.AbortRequest(request_id="to-abort")).found


def test_client_cancel_aborts_and_frees_blocks(small_pool_mesh):
    address = small_pool_mesh.attention[0].grpc
    with grpc.insecure_channel(address) as ch:
        stream = attention_pb2_grpc.AttentionStub(ch).Generate(attention_pb2.GenerateRequest(
            request_id="to-cancel", prompt_token_ids=[1, 2, 3],
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)),
            timeout=60)
        next(stream)
        stream.cancel()
    assert wait_free_blocks(address, NUM_BLOCKS) == NUM_BLOCKS


def test_request_larger_than_kv_pool_is_refused(small_pool_mesh):
    with pytest.raises(grpc.RpcError) as info:
        grpc_generate(small_pool_mesh.attention[0].grpc, "too-big", list(range(1, 11)), 20)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "KV pool has only 4 blocks" in info.value.details()


@pytest.mark.parametrize("field,value,message", [
    ("prompt_token_ids", [], "empty"),
    ("prompt_token_ids", [1, 10**6], "outside the vocabulary"),
    ("request_id", "", "request_id"),
])
def test_bad_generate_requests_are_invalid_argument(small_pool_mesh, field, value, message):
    req = attention_pb2.GenerateRequest(request_id="bad", prompt_token_ids=[1],
                                        sampling=common_pb2.SamplingParams(max_tokens=2))
    if isinstance(value, list):
        del req.prompt_token_ids[:]
        req.prompt_token_ids.extend(value)
    else:
        setattr(req, field, value)
    with grpc.insecure_channel(small_pool_mesh.attention[0].grpc) as ch:
        with pytest.raises(grpc.RpcError) as info:
            list(attention_pb2_grpc.AttentionStub(ch).Generate(req, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_more_requests_than_fit_wait_and_complete(small_pool_mesh, engine_ckpt, hf_greedy):
    prompts = [[7, 8, 9, 10], [11, 12], [13, 14, 15], [16], [17, 18, 19, 20]]
    results: dict[int, list[int]] = {}

    def one(i: int) -> None:
        results[i] = grpc_generate(small_pool_mesh.attention[0].grpc, f"q{i}", prompts[i],
                                   8).tokens

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    want = hf_greedy(engine_ckpt("mixtral"), prompts, 8)
    assert [results.get(i) for i in range(len(prompts))] == want
    assert wait_free_blocks(small_pool_mesh.attention[0].grpc, NUM_BLOCKS) == NUM_BLOCKS


# ----------------------------------------------------------------------------- expert node
@pytest.fixture(scope="module")
def expert_node(lone_expert):
    return lone_expert("0-3", "lone-expert")  # half the experts: rows for the others refused


def attach(node, sender_id: int) -> tuple[libm2n.Receiver, expert_pb2.AttachResponse]:
    rx = libm2n.open_receiver("tcp://127.0.0.1:0")
    with grpc.insecure_channel(node.grpc) as ch:
        resp = expert_pb2_grpc.ExpertStub(ch).Attach(expert_pb2.AttachRequest(
            node_id=f"test-{sender_id}", m2n_sender_id=sender_id, reply_url=rx.url), timeout=30)
    return rx, resp


def roundtrip(tx: libm2n.Sender, rx: libm2n.Receiver, payload: torch.Tensor, layer: int,
              tag: int) -> torch.Tensor:
    tx.send(payload, layer=layer, tag=tag).result(timeout=10)
    with rx.recv(timeout=20) as msg:
        assert msg.header.tag == tag
        return msg.tensor().clone()


def test_expert_refuses_bad_dispatches_and_keeps_serving(expert_node, engine_ckpt):
    path = engine_ckpt("mixtral")
    rx, resp = attach(expert_node, 77)
    assert list(resp.expert_ids) == [0, 1, 2, 3] and resp.num_experts == 8
    H, K = 64, 2
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(5, H, generator=g)
    ids = torch.tensor([[0, 1], [2, -1], [3, 0], [1, 2], [-1, 3]])
    weights = torch.rand(5, K, generator=g)
    good = moe_wire.pack_dispatch(rows, ids, weights)
    tx = libm2n.connect(resp.dispatch_url, libm2n.SenderConfig(sender_id=77, epoch=resp.epoch))
    try:
        bad_cases = [
            (torch.zeros(3, H), 0, "uint8"),                                     # not the wire
            (moe_wire.pack_dispatch(rows.bfloat16(), ids, weights), 0,           # other --dtype
             "the replica and the node must run the same model and --dtype"),
            (moe_wire.pack_dispatch(rows, ids.clamp(min=0) + 4, weights), 0, "not hosted"),
            (good, 99, "not a sparse layer"),                                    # bad layer
        ]
        for tag, (payload, layer, text) in enumerate(bad_cases, start=1):
            reply = roundtrip(tx, rx, payload, layer, tag)
            assert moe_wire.is_error(reply) and text in moe_wire.error_text(reply)

        # garbage on a raw socket to the dispatch port: refused by libm2n, node unaffected
        host, port = resp.dispatch_url.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"\x00garbage" * 64)

        reply = roundtrip(tx, rx, good, 2, 10)
        assert not moe_wire.is_error(reply)
        want = ExpertSide.from_pretrained(path, [0, 1, 2, 3]).forward(2, rows, ids, weights)
        torch.testing.assert_close(reply, want, rtol=0, atol=1e-5)
    finally:
        tx.close()

    # after the node moves to placement epoch 10, a sender still on epoch 0 is refused
    with grpc.insecure_channel(expert_node.grpc) as ch:
        applied = expert_pb2_grpc.ExpertStub(ch).UpdatePlacement(
            common_pb2.ExpertPlacement(epoch=10, num_experts=8), timeout=10).applied_epoch
    assert applied == 10
    rx2, _ = attach(expert_node, 78)
    stale = libm2n.connect(resp.dispatch_url, libm2n.SenderConfig(sender_id=78,
                                                                  epoch=resp.epoch))
    try:
        reply = roundtrip(stale, rx2, good, 0, 1)
        assert moe_wire.is_error(reply)
        assert moe_wire.error_text(reply).startswith(moe_wire.STALE_EPOCH)  # the replica waits
    finally:
        stale.close()
    with grpc.insecure_channel(expert_node.grpc) as ch:
        stats = expert_pb2_grpc.ExpertStub(ch).GetStats(expert_pb2.GetStatsRequest(), timeout=10)
    assert stats.messages_received >= 6 and stats.bad_frames >= 5
    assert sum(stats.rows_by_expert.values()) == int((ids >= 0).sum())
    rx.close()
    rx2.close()


def test_expert_reattach_to_the_same_replica_replaces_its_reply_link(expert_node):
    rx, resp = attach(expert_node, 79)
    try:
        for _ in range(2):  # the second Attach reuses the reply URL (a replica re-attaching)
            with grpc.insecure_channel(expert_node.grpc) as ch:
                expert_pb2_grpc.ExpertStub(ch).Attach(expert_pb2.AttachRequest(
                    node_id="test-79", m2n_sender_id=79, reply_url=rx.url), timeout=30)
        payload = moe_wire.pack_dispatch(torch.randn(2, 64), torch.tensor([[0, 1], [2, 3]]),
                                         torch.rand(2, 2))
        with libm2n.connect(resp.dispatch_url, libm2n.SenderConfig(
                sender_id=79, epoch=resp.epoch)) as tx:
            assert not moe_wire.is_error(roundtrip(tx, rx, payload, 0, 1))
    finally:
        rx.close()


def test_dead_expert_node_fails_requests_with_clear_error(engine_ckpt, tmp_path):
    with LocalMesh.start(engine_ckpt("mixtral"), [[0, 1, 2, 3], [4, 5, 6, 7]],
                         attention_args=["--expert-timeout", "3", "--expert-wait", "1"],
                         workdir=tmp_path) as mesh:
        address = mesh.attention[0].grpc
        with grpc.insecure_channel(address) as ch:
            stream = attention_pb2_grpc.AttentionStub(ch).Generate(
                attention_pb2.GenerateRequest(
                    request_id="victim", prompt_token_ids=[1, 2, 3],
                    sampling=common_pb2.SamplingParams(temperature=0, max_tokens=3000,
                                                       ignore_eos=True)),
                timeout=60)  # hang guard only: the failure must come long before this
            next(stream)
            mesh.experts[1].kill()
            last = list(stream)[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_ERROR
        assert "expert node" in last.error_message
        # later requests fail fast too, instead of hanging
        after = grpc_generate(address, "after", [4, 5], 4, timeout=60)
        assert after.final.finish_reason == common_pb2.FINISH_REASON_ERROR
        assert mesh.attention[0].alive()


def test_a_request_whose_logits_are_not_finite_fails_nobody(engine_ckpt, tmp_path):
    """A checkpoint whose LM head has a NaN row. Greedy decoding goes on (argmax takes the NaN
    as the max); a sampled request's distribution is not finite, so it keeps its argmax
    instead of failing the draw (which used to fail its whole lane step). Both requests
    finish with their tokens, every KV block comes back and the replica keeps serving."""
    ckpt = tmp_path / "nan-lm-head"
    shutil.copytree(engine_ckpt("mixtral"), ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["lm_head.weight"][7] = float("nan")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    blocks = 64
    with LocalMesh.start(ckpt, [list(range(8))], micro_batches=2,
                         attention_args=["--block-size", "4", "--num-blocks", str(blocks)],
                         workdir=tmp_path / "mesh") as mesh:
        address = mesh.attention[0].grpc
        started, out = threading.Event(), {}

        def greedy() -> None:  # admitted first: lane 0
            out["greedy"] = grpc_generate(address, "greedy", [1, 2, 3], 24,
                                          on_event=lambda _ev: started.set())

        thread = threading.Thread(target=greedy)
        thread.start()
        assert started.wait(30), "the greedy request produced no token"
        sampled = grpc_generate(address, "sampled", [4, 5], 8, temperature=1.0, seed=1)
        thread.join(timeout=60)
        assert sampled.final.error_message == ""
        assert sampled.final.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert sampled.tokens == [7] * 8  # the NaN row is every step's argmax
        kept = out["greedy"]
        assert kept.final.error_message == "" and len(kept.tokens) == 24
        assert wait_free_blocks(address, blocks) == blocks
        after = grpc_generate(address, "after", [6, 7], 4)
        assert after.final.error_message == "" and len(after.tokens) == 4
        assert mesh.attention[0].alive()
