"""An elastic expert node (``--experts auto``): it starts with no experts and serves what
``Expert.LoadExperts`` assigns it, loaded from the checkpoint; the previous assignment is kept
until the next one; its dispatches are computed as a fixed node's are."""

from __future__ import annotations

import grpc
import pytest
import torch

import libm2n
from megascale.v1 import expert_pb2, expert_pb2_grpc
from services.core import moe_wire
from services.core.model import ExpertSide
from services.launch.procs import spawn_role


@pytest.fixture(scope="module")
def elastic(engine_ckpt, tmp_path_factory):
    # The scheduler address is never reached here: LoadExperts is called directly.
    node = spawn_role("expert", ["--model", str(engine_ckpt("mixtral")), "--experts", "auto",
                                 "--scheduler", "127.0.0.1:9", "--m2n-sender-id", "4242"],
                      "elastic-0", tmp_path_factory.mktemp("elastic"))
    yield node
    node.stop()


def _load(stub, ids):
    return list(stub.LoadExperts(expert_pb2.LoadExpertsRequest(expert_ids=ids),
                                 timeout=30).expert_ids)


def test_loads_what_it_is_assigned_and_keeps_the_previous_set_one_call(elastic, engine_ckpt):
    with grpc.insecure_channel(elastic.grpc) as ch:
        stub = expert_pb2_grpc.ExpertStub(ch)
        assert list(stub.GetStats(expert_pb2.GetStatsRequest()).expert_ids) == []
        assert _load(stub, [0, 1]) == [0, 1]
        assert _load(stub, [2]) == [0, 1, 2]      # replicas may still route by [0, 1]
        assert _load(stub, [2, 5]) == [2, 5]      # [0, 1] is two assignments old
        assert list(stub.GetStats(expert_pb2.GetStatsRequest()).expert_ids) == [2, 5]
        with pytest.raises(grpc.RpcError) as err:
            _load(stub, [99])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "out of range" in err.value.details()


def test_dispatches_to_loaded_experts_match_the_checkpoint(elastic, engine_ckpt, tmp_path):
    model = engine_ckpt("mixtral")
    with grpc.insecure_channel(elastic.grpc) as ch:
        stub = expert_pb2_grpc.ExpertStub(ch)
        _load(stub, [3, 6])
        assert _load(stub, [3, 6]) == [3, 6]  # the same twice: nothing else is kept
        rx = libm2n.open_receiver("tcp://127.0.0.1:0", libm2n.ReceiverConfig())
        try:
            att = stub.Attach(expert_pb2.AttachRequest(node_id="t", m2n_sender_id=7,
                                                       reply_url=rx.url), timeout=30)
            assert list(att.expert_ids) == [3, 6]
            ref = ExpertSide.from_pretrained(model, [3, 6])
            hidden, k = ref.cfg.hidden_size, ref.cfg.top_k
            rows = torch.randn(4, hidden)
            ids = torch.tensor([[3, 6], [6, -1], [3, -1], [6, 3]])
            weights = torch.rand(4, k)
            layer = ref.cfg.sparse_layer_ids[0]
            with libm2n.connect(att.dispatch_url, libm2n.SenderConfig(
                    sender_id=7, epoch=att.epoch)) as tx:
                tx.send(moe_wire.pack_dispatch(rows, ids, weights), step=0, layer=layer,
                        micro_batch=0, tag=1).result(10)
                with rx.recv(timeout=30) as reply:
                    got = reply.tensor().clone()
            want = ref.forward(layer, rows, ids, weights)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        finally:
            rx.close()


def test_a_fixed_node_refuses_load_experts(lone_expert):
    node = lone_expert("0-3", "fixed-refuses")
    with grpc.insecure_channel(node.grpc) as ch:
        with pytest.raises(grpc.RpcError) as err:
            _load(expert_pb2_grpc.ExpertStub(ch), [4])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
