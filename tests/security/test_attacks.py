"""The attacks of issue #25, each against real parts, each refused.

A real expert node process (started with a cluster token), real gRPC calls with forged or
missing credentials, a real in-process ExpertClient whose reply port is sprayed with forged
replies, and libm2n receivers flooded with idle connections and fake senders.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from rpc_helpers import as_role, status_of

import libm2n
from megascale.v1 import common_pb2, expert_pb2, expert_pb2_grpc
from services.attention.dispatch import ExpertClient
from services.attention.placement import ExpertAttacher, attach_experts
from services.common import auth
from services.common.epochs import MAX_EPOCH_STEP
from services.core.config import ModelConfig
from services.core.demo import write_random_checkpoint
from services.core.model import MoEInput
from services.launch.procs import spawn_role

pytestmark = pytest.mark.usefixtures("restore_auth")

TOKEN = b"0123456789abcdef0123456789abcdef-attack-tests"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:  # noqa: ANN001
    return write_random_checkpoint(tmp_path_factory.mktemp("mixtral"), "mixtral",
                                   tokenizer=False, layers=2, hidden=64, intermediate=96,
                                   experts=8, top_k=2, heads=4, kv_heads=2, vocab=512, seed=25)


def _token_expert(ckpt: Path, workdir: Path, name: str, *args: str):  # noqa: ANN202
    """A real expert node hosting every expert that requires the cluster token."""
    token_file = workdir / "cluster.token"
    token_file.write_bytes(TOKEN)
    token_file.chmod(0o600)
    return spawn_role("expert", ["--model", str(ckpt), "--experts", "0-7", *args], name,
                      workdir, env={"MEGASCALE_CLUSTER_TOKEN_FILE": str(token_file)})


@pytest.fixture(scope="module")
def expert(ckpt, tmp_path_factory):  # noqa: ANN001, ANN201
    """One expert node hosting every expert, requiring the cluster token."""
    node = _token_expert(ckpt, tmp_path_factory.mktemp("expert"), "attack-expert",
                         "--m2n-sender-id", "500")
    yield node
    node.stop()


def test_unauthenticated_and_wrong_role_calls_are_refused(expert) -> None:  # noqa: ANN001
    async def body() -> None:
        async with grpc.aio.insecure_channel(expert.grpc) as ch:
            stub = expert_pb2_grpc.ExpertStub(ch)
            p = common_pb2.ExpertPlacement(epoch=3)
            assert await status_of(stub.UpdatePlacement(p)) == grpc.StatusCode.UNAUTHENTICATED
            assert await status_of(stub.GetStats(expert_pb2.GetStatsRequest())) == \
                grpc.StatusCode.UNAUTHENTICATED
            for role in ("attention", "gateway", "expert", "admin"):
                assert await status_of(stub.UpdatePlacement(p, metadata=as_role(TOKEN, role))) == \
                    grpc.StatusCode.PERMISSION_DENIED, role
            attach = expert_pb2.AttachRequest(node_id="x", m2n_sender_id=9,
                                              reply_url="tcp://127.0.0.1:1")
            for role in ("gateway", "scheduler", "expert"):
                assert await status_of(stub.Attach(attach, metadata=as_role(TOKEN, role))) == \
                    grpc.StatusCode.PERMISSION_DENIED, role

    asyncio.run(asyncio.wait_for(body(), 30))


def test_placement_epoch_jumps_are_bounded(expert) -> None:  # noqa: ANN001
    async def body() -> None:
        async with grpc.aio.insecure_channel(expert.grpc) as ch:
            stub = expert_pb2_grpc.ExpertStub(ch)
            sched = as_role(TOKEN, "scheduler")
            up = common_pb2.ExpertPlacement
            assert await status_of(stub.UpdatePlacement(up(epoch=2**62), metadata=sched)) == \
                grpc.StatusCode.INVALID_ARGUMENT
            first = await stub.UpdatePlacement(up(epoch=7), metadata=sched)
            assert first.applied_epoch == 7
            assert await status_of(stub.UpdatePlacement(up(epoch=8 + MAX_EPOCH_STEP),
                                                    metadata=sched)) == \
                grpc.StatusCode.INVALID_ARGUMENT
            ok = await stub.UpdatePlacement(up(epoch=7 + MAX_EPOCH_STEP), metadata=sched)
            assert ok.applied_epoch == 7 + MAX_EPOCH_STEP
            older = await stub.UpdatePlacement(up(epoch=5), metadata=sched)
            assert older.applied_epoch == 7 + MAX_EPOCH_STEP  # monotonic

    asyncio.run(asyncio.wait_for(body(), 30))


def test_attach_cannot_take_a_live_sender_id(expert) -> None:  # noqa: ANN001
    cfg = libm2n.ReceiverConfig(auth_token=TOKEN)
    with libm2n.open_receiver("tcp://127.0.0.1:0", cfg) as mine, \
            libm2n.open_receiver("tcp://127.0.0.1:0", cfg) as thief:
        async def body() -> None:
            async with grpc.aio.insecure_channel(expert.grpc) as ch:
                stub = expert_pb2_grpc.ExpertStub(ch)
                req = expert_pb2.AttachRequest(node_id="a-0", m2n_sender_id=41,
                                               reply_url=mine.url)
                await stub.Attach(req, metadata=as_role(TOKEN, "attention"))
                # the same replica again: fine
                await stub.Attach(req, metadata=as_role(TOKEN, "attention"))
                stolen = expert_pb2.AttachRequest(node_id="a-0", m2n_sender_id=41,
                                                  reply_url=thief.url)
                try:
                    await stub.Attach(stolen, metadata=as_role(TOKEN, "attention"))
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.ALREADY_EXISTS
                    assert "live replica" in exc.details()
                else:
                    raise AssertionError("a second Attach took a live replica's sender id")
        asyncio.run(asyncio.wait_for(body(), 30))
        assert thief.peers() == []


def test_forged_replies_on_the_reply_port_are_dropped(expert, ckpt) -> None:  # noqa: ANN001
    """A token holder that is not the node a dispatch went to answers it first, with the
    exact tags in flight: the replica drops those replies, counts them, and combines the real
    node's."""
    from services.attention.config import AttentionConfig

    auth.configure(TOKEN, "attention")
    cfg = ModelConfig.from_pretrained(ckpt)
    reply_rx = libm2n.open_receiver("tcp://127.0.0.1:0", libm2n.ReceiverConfig(auth_token=TOKEN))
    attacher = ExpertAttacher("spray-test", 77, reply_rx.url, cfg.num_experts)
    config = AttentionConfig(model_dir=ckpt, expert_nodes=(expert.grpc,))
    placement = asyncio.run(attach_experts(config, attacher))
    assert attacher.reply_senders == {"attack-expert": 500}
    client = ExpertClient(placement, reply_rx, 77, cfg.hidden_size, cfg.top_k,
                          auth_token=TOKEN, reply_senders=attacher.reply_senders)
    forger = libm2n.connect(reply_rx.url, libm2n.SenderConfig(sender_id=666, auth_token=TOKEN))
    try:
        torch.manual_seed(0)
        t = 6
        normed = torch.randn(t, cfg.hidden_size)
        ids = torch.stack([torch.randperm(cfg.num_experts)[:cfg.top_k] for _ in range(t)])
        moe = MoEInput(layer=0, residual=torch.zeros(t, cfg.hidden_size), normed=normed,
                       topk_ids=ids, topk_weights=torch.full((t, cfg.top_k), 0.5),
                       routed=True)
        want = client.combine(client.dispatch(0, moe, 0), torch.float32, torch.device("cpu"))
        os.kill(expert.proc.pid, signal.SIGSTOP)  # the real node answers only after the forger
        try:
            pending = client.dispatch(1, moe, 0)
            sent = len(pending.waiting)
            for tag in pending.waiting:
                forger.send(torch.full((t, cfg.hidden_size), 1e6), tag=tag).result(5)
            deadline = time.monotonic() + 5
            while client.forged_replies < sent and time.monotonic() < deadline:
                client.ready(pending)
        finally:
            os.kill(expert.proc.pid, signal.SIGCONT)
        got = client.combine(pending, torch.float32, torch.device("cpu"))
        assert client.forged_replies == sent >= 1
        torch.testing.assert_close(got, want)
    finally:
        forger.close()
        client.close()
        reply_rx.close()


def _threads_named(name: str) -> int:
    return sum(t.name == name for t in threading.enumerate())


def test_idle_connections_do_not_take_a_thread_each() -> None:
    rx = libm2n.open_receiver("tcp://127.0.0.1:0", libm2n.ReceiverConfig(
        auth_token=TOKEN, handshake_timeout_s=3.0))
    host, port = rx.url.removeprefix("tcp://").rsplit(":", 1)
    socks: list[socket.socket] = []
    try:
        name = f"m2n-handshake-{rx.url}"
        peak = 0
        for _ in range(3000):
            try:
                socks.append(socket.create_connection((host, int(port)), timeout=2))
            except OSError:
                pass  # the backlog is full: refused by the kernel, no thread either
            if len(socks) % 100 == 0:
                peak = max(peak, _threads_named(name))
        peak = max(peak, _threads_named(name))
        # + 2: a handshake thread that has given its slot back may not have exited yet
        assert peak <= rx.config.max_handshakes_per_host + 2, (peak, rx.stats())
        assert rx.stats()["refused_busy"] > 0, rx.stats()
        # a real sender still gets in once the idle ones are gone
        for s in socks:
            s.close()
        socks.clear()
        with libm2n.connect(rx.url, libm2n.SenderConfig(sender_id=1, auth_token=TOKEN,
                                                        connect_timeout_s=10)) as tx:
            tx.send(torch.ones(4)).result(5)
            with rx.recv(timeout=10) as msg:
                assert msg.tensor().sum().item() == 4
    finally:
        for s in socks:
            s.close()
        rx.close()


def test_fake_senders_are_bounded_in_memory() -> None:
    per_sender = 4 * (1 << 20)
    rx = libm2n.open_receiver("tcp://127.0.0.1:0", libm2n.ReceiverConfig(
        auth_token=TOKEN, slots_per_sender=4, slot_bytes=1 << 20,
        max_slot_memory_bytes=8 * per_sender))
    senders = []
    try:
        # without the token: refused before any slot memory is allocated
        for i in range(40):
            with pytest.raises(libm2n.M2NError):
                libm2n.connect(rx.url, libm2n.SenderConfig(sender_id=1000 + i,
                                                           auth_token=b"x" * 32))
        assert rx.stats()["refused_unauthenticated"] == 40
        # with it (a compromised holder): admitted up to the memory bound, then refused
        admitted = refused = 0
        for i in range(40):
            try:
                senders.append(libm2n.connect(rx.url, libm2n.SenderConfig(
                    sender_id=2000 + i, auth_token=TOKEN)))
                admitted += 1
            except libm2n.M2NError:
                refused += 1
        assert admitted == 8 and refused == 32
        assert rx.stats()["refused_memory"] == 32
        # one leaves: its memory is free for the next
        senders.pop().close()
        deadline = time.monotonic() + 5
        while len(rx.peers()) > 7 and time.monotonic() < deadline:
            rx.poll()
            time.sleep(0.01)
        senders.append(libm2n.connect(rx.url, libm2n.SenderConfig(sender_id=3000,
                                                                  auth_token=TOKEN)))
    finally:
        for s in senders:
            s.close()
        rx.close()


def test_an_expert_node_bounds_the_slot_memory_token_holders_take(ckpt, tmp_path):  # noqa: ANN001
    """A real expert node gives slot memory to --max-attention-replicas senders' worth; the
    next one is refused even when it holds the token."""
    node = _token_expert(ckpt, tmp_path, "bounded-expert", "--max-attention-replicas", "2")
    senders, refused = [], 0
    try:
        for i in range(5):
            try:
                senders.append(libm2n.connect(node.info["m2n_url"], libm2n.SenderConfig(
                    sender_id=4000 + i, auth_token=TOKEN)))
            except libm2n.M2NError:
                refused += 1
        assert (len(senders), refused) == (2, 3)
    finally:
        for s in senders:
            s.close()
        node.stop()
