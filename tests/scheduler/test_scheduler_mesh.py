"""End to end with real processes: `megascale serve scheduler`, expert nodes and an attention
replica. The scheduler pushes its placement to the nodes' UpdatePlacement (their epochs move),
generation works on the pushed table, and a dead expert node is routed around after its lease
expires."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import grpc
import pytest
from metrics_helpers import scrape_metrics
from sched_helpers import eventually, run

from megascale.v1 import (
    attention_pb2,
    attention_pb2_grpc,
    common_pb2,
    expert_pb2,
    expert_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from services.common.registration import NodeRegistration
from services.launch.procs import LocalMesh, spawn_role

NUM_EXPERTS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.core.demo import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("sched-model"), "mixtral", layers=2,
                                   hidden=32, intermediate=48, experts=NUM_EXPERTS, top_k=2,
                                   heads=2, kv_heads=1, vocab=128, tokenizer=False)


async def _epoch(stub) -> int:
    """A node's placement epoch: UpdatePlacement with epoch 0 is ignored and answers it."""
    resp = await stub.UpdatePlacement(common_pb2.ExpertPlacement(epoch=0), timeout=5)
    return resp.applied_epoch


async def _generate(stub) -> list[int]:
    req = attention_pb2.GenerateRequest(
        request_id="r", prompt_token_ids=[1, 2, 3, 4],
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=3))
    tokens, last = [], None
    async for ev in stub.Generate(req, timeout=60):
        tokens += list(ev.token_ids)
        last = ev
    assert last is not None and last.finish_reason == common_pb2.FINISH_REASON_LENGTH, last
    return tokens


async def _generates_through(a_stub, node, want: list[int]) -> None:  # noqa: ANN001
    """A greedy generation on the replica gives ``want`` and sends rows to expert ``node``
    (a RoleProcess)."""
    async with grpc.aio.insecure_channel(node.grpc) as ch:
        e_stub = expert_pb2_grpc.ExpertStub(ch)

        async def received() -> int:
            stats = await e_stub.GetStats(expert_pb2.GetStatsRequest(), timeout=5)
            return stats.messages_received

        before = await received()
        assert await _generate(a_stub) == want  # greedy: the same tokens whatever the table
        assert await received() > before, f"no rows reached {node.name}"


def _expert_info(e) -> common_pb2.NodeInfo:  # noqa: ANN001 - a RoleProcess
    """The NodeInfo an expert process would register with (from its ready file)."""
    return common_pb2.NodeInfo(node_id=e.info["node_id"], role=common_pb2.NODE_ROLE_EXPERT,
                               grpc_address=e.grpc, m2n_url=e.info["m2n_url"],
                               expert_ids=e.info["expert_ids"])


def _infos(mesh: LocalMesh, attention: bool) -> list[common_pb2.NodeInfo]:
    """The NodeInfo each mesh process would register with (from its ready file)."""
    out = [_expert_info(e) for e in mesh.experts]
    if attention:
        att = mesh.attention[0]
        out.append(common_pb2.NodeInfo(
            node_id=att.info["node_id"], role=common_pb2.NODE_ROLE_ATTENTION,
            grpc_address=att.grpc, m2n_url=att.info["m2n_url"], kv_blocks=512,
            kv_block_size=16, max_running_requests=64))
    return out


@contextlib.asynccontextmanager
async def _session(sched, infos: list[common_pb2.NodeInfo], addresses: list[str]):  # noqa: ANN001
    """(registrations for ``infos``, not started; channels to the scheduler, then
    ``addresses``); every registration in the list (appended ones too) is stopped after."""
    regs = [NodeRegistration(sched.grpc, i, max_backoff_s=0.2) for i in infos]
    channels = [grpc.aio.insecure_channel(x) for x in (sched.grpc, *addresses)]
    try:
        yield regs, channels
    finally:
        for r in regs:
            await r.stop()
        for c in channels:
            await c.close()


@contextlib.asynccontextmanager
async def _attention_session(sched, mesh: LocalMesh):  # noqa: ANN001
    """:func:`_session` over every node of ``mesh`` (registrations not started), with stubs
    for the scheduler and the mesh's attention replica."""
    async with _session(sched, _infos(mesh, attention=True),
                        [mesh.attention[0].grpc]) as (regs, channels):
        yield (regs, scheduler_pb2_grpc.SchedulerStub(channels[0]),
               attention_pb2_grpc.AttentionStub(channels[1]))


async def _place_on(regs: list[NodeRegistration], s_stub, a_stub, nodes: int  # noqa: ANN001
                   ) -> common_pb2.ExpertPlacement:
    """Start the registrations; wait for a complete placement on ``nodes`` expert nodes and
    for the replica to be at its epoch."""
    for r in regs:
        await r.start()
    placement = await eventually(lambda: _complete(s_stub, nodes=nodes), timeout=20,
                                 what=f"a complete placement on {nodes} node(s)")
    await eventually(lambda: _at(a_stub, placement.epoch), timeout=10,
                     what="attention at the pushed epoch")
    return placement


async def _join_expert(sched, regs: list[NodeRegistration], model_dir: Path, node_id: str,  # noqa: ANN001
                       tmp_path: Path):
    """Start an expert node hosting experts 2 and 3 under ``node_id`` and register it (its
    registration joins ``regs``, stopped by :func:`_session`)."""
    node = spawn_role("expert", ["--model", str(model_dir), "--experts", "2,3",
                                 "--m2n-url", "tcp://127.0.0.1:0", "--m2n-sender-id", "1001"],
                      node_id, tmp_path, log=tmp_path / f"{node_id}-joined.log")
    regs.append(NodeRegistration(sched.grpc, _expert_info(node), max_backoff_s=0.2))
    await regs[-1].start()
    return node


def _start_scheduler(model_dir: Path, redis_url: str, tmp_path: Path, prefix: str,
                     *extra: str):
    return spawn_role("scheduler", ["--redis-url", redis_url, "--model", str(model_dir),
                                    "--node-ttl", "1", "--key-prefix", prefix,
                                    "--stats-interval", "0.5", *extra],
                      "scheduler-0", tmp_path, log=tmp_path / "scheduler.log")


def test_placement_pushed_to_real_expert_nodes_and_dead_node_dropped(model_dir, redis_url,
                                                                     tmp_path):
    # Node 0 holds every expert, node 1 holds 2 and 3: both serve until node 1 dies.
    mesh = LocalMesh.start(model_dir, [[0, 1, 2, 3], [2, 3]], attention_replicas=0,
                           workdir=tmp_path)
    sched = None
    try:
        sched = _start_scheduler(model_dir, redis_url, tmp_path, "mesh-experts:")
        assert sched.info["role"] == "scheduler" and sched.info["grpc"]

        async def body():
            async with _session(sched, _infos(mesh, attention=False),
                                [e.grpc for e in mesh.experts]) as (regs, channels):
                s_stub = scheduler_pb2_grpc.SchedulerStub(channels[0])
                e_stubs = [expert_pb2_grpc.ExpertStub(c) for c in channels[1:]]
                assert [await _epoch(s) for s in e_stubs] == [0, 0]
                for r in regs:
                    await r.start()
                assert all([await r.wait_registered(20) for r in regs])
                # Once both nodes joined, the table spreads experts 2 and 3 over them.
                placement = await eventually(lambda: _complete(s_stub, nodes=2), timeout=20,
                                             what="a complete placement on both nodes")
                hosts = {r.expert_id: {h.node_id for h in r.hosts} for r in placement.experts}
                assert hosts[0] == hosts[1] == {"expert-0"}
                # Pushed: both expert nodes moved to the scheduler's epoch.
                for stub in e_stubs:
                    await eventually(lambda s=stub: _at(s, placement.epoch), timeout=10,
                                     what="UpdatePlacement push")
                # expert-1 dies without deregistering: its lease expires and the scheduler
                # publishes a table without it, pushed to the survivor.
                await regs[1].stop(deregister=False)
                mesh.experts[1].kill()
                newer = await eventually(lambda: _complete(s_stub, placement.epoch), timeout=20,
                                         what="placement without expert-1")
                assert all({h.node_id for h in r.hosts} == {"expert-0"} for r in newer.experts)
                await eventually(lambda: _at(e_stubs[0], newer.epoch), timeout=10,
                                 what="push of the new epoch")

        run(body, timeout=120)
    finally:
        if sched is not None:
            sched.stop()
        mesh.stop()


def test_attention_adopts_pushed_placement_and_generates(model_dir, redis_url, tmp_path):
    mesh = LocalMesh.start(model_dir, [[0, 1, 2, 3], [2, 3]], attention_replicas=1,
                           workdir=tmp_path)
    sched = None
    try:
        sched = _start_scheduler(model_dir, redis_url, tmp_path, "mesh-attention:")

        async def body():
            async with _attention_session(sched, mesh) as (regs, s_stub, a_stub):
                first = await _generate(a_stub)  # on the static Attach placement
                placement = await _place_on(regs, s_stub, a_stub, nodes=2)
                assert await _generate(a_stub) == first  # greedy: same tokens
                await regs[1].stop(deregister=False)
                mesh.experts[1].kill()
                newer = await eventually(lambda: _complete(s_stub, placement.epoch), timeout=20,
                                         what="placement without expert-1")
                await eventually(lambda: _at(a_stub, newer.epoch), timeout=10,
                                 what="attention at the newer epoch")
                assert await _generate(a_stub) == first

        run(body, timeout=120)
    finally:
        if sched is not None:
            sched.stop()
        mesh.stop()


def test_attention_attaches_to_an_expert_node_that_joins_later(model_dir, redis_url, tmp_path):
    # The replica starts attached to expert-0 only; expert-late joins afterwards and the
    # scheduler's placement spreads experts 2 and 3 onto it. The replica must Attach to it
    # (at the grpc_address in the placement), adopt the table and route rows to it.
    mesh = LocalMesh.start(model_dir, [[0, 1, 2, 3]], attention_replicas=1, workdir=tmp_path)
    sched = late = None
    try:
        sched = _start_scheduler(model_dir, redis_url, tmp_path, "mesh-late:")

        async def body():
            nonlocal late
            async with _attention_session(sched, mesh) as (regs, s_stub, a_stub):
                first = await _generate(a_stub)
                # A pushed table naming a node the replica cannot attach to is refused whole.
                ghost = common_pb2.ExpertPlacement(epoch=99, num_experts=NUM_EXPERTS, experts=[
                    common_pb2.ExpertReplicas(expert_id=e, hosts=[common_pb2.ExpertHost(
                        node_id="ghost", m2n_url="tcp://127.0.0.1:9")])
                    for e in range(NUM_EXPERTS)])
                with pytest.raises(grpc.aio.AioRpcError) as bad:
                    await a_stub.UpdatePlacement(ghost, timeout=10)
                assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "ghost" in bad.value.details() and "grpc_address" in bad.value.details()
                assert await _epoch(a_stub) < 99
                placement = await _place_on(regs, s_stub, a_stub, nodes=1)  # expert-0
                late = await _join_expert(sched, regs, model_dir, "expert-late", tmp_path)
                both = await eventually(lambda: _complete(s_stub, placement.epoch, nodes=2),
                                        timeout=20, what="a placement using expert-late")
                assert any(h.grpc_address == late.grpc for r in both.experts for h in r.hosts)
                await eventually(lambda: _at(a_stub, both.epoch), timeout=20,
                                 what="attention attached and at the new epoch")
                await _generates_through(a_stub, late, first)  # the node that joined later

        run(body, timeout=150)
    finally:
        for p in (late, sched):
            if p is not None:
                p.stop()
        mesh.stop()


async def _complete(stub, after: int = 0, nodes: int = 1) -> common_pb2.ExpertPlacement | None:
    """The scheduler's placement once it is newer than ``after`` and uses ``nodes`` nodes."""
    p = await stub.GetPlacement(scheduler_pb2.GetPlacementRequest(), timeout=5)
    used = {h.node_id for r in p.experts for h in r.hosts}
    ok = p.epoch > after and len(p.experts) == NUM_EXPERTS and len(used) == nodes
    return p if ok else None


async def _at(stub, epoch: int) -> bool:
    try:
        return await _epoch(stub) == epoch
    except grpc.aio.AioRpcError:
        return False



def test_restarted_expert_node_is_routed_around_then_attached_again(model_dir, redis_url,
                                                                     tmp_path):
    # expert-1 is killed; the scheduler's table has experts on it alone, so the replica fails
    # those requests and routes around it. It restarts under the same node id at new addresses
    # and registers again; the replica must Attach it anew (the new process has no reply link
    # to the replica) and route rows to it again.
    mesh = LocalMesh.start(model_dir, [[0, 1, 2, 3], [2, 3]], attention_replicas=1,
                           attention_args=["--expert-timeout", "3"], workdir=tmp_path)
    sched = reborn = None
    try:
        sched = _start_scheduler(model_dir, redis_url, tmp_path, "mesh-restart:")
        victim = mesh.experts[1].info["node_id"]

        async def body():
            nonlocal reborn
            async with _attention_session(sched, mesh) as (regs, s_stub, a_stub):
                first = await _generate(a_stub)
                placement = await _place_on(regs, s_stub, a_stub, nodes=2)
                mesh.experts[1].kill()
                req = attention_pb2.GenerateRequest(
                    request_id="while-down", prompt_token_ids=[1, 2, 3, 4],
                    sampling=common_pb2.SamplingParams(temperature=0, max_tokens=3))
                last = [ev async for ev in a_stub.Generate(req, timeout=60)][-1]
                assert last.finish_reason == common_pb2.FINISH_REASON_ERROR
                assert f"{victim} is down" in last.error_message
                await regs[1].stop(deregister=False)
                reborn = await _join_expert(sched, regs, model_dir, victim, tmp_path)

                async def reborn_used() -> common_pb2.ExpertPlacement | None:
                    p = await _complete(s_stub, placement.epoch, nodes=2)
                    hosts = [h for r in (p.experts if p else ()) for h in r.hosts]
                    return p if any(h.grpc_address == reborn.grpc for h in hosts) else None

                newer = await eventually(reborn_used, timeout=30,
                                         what="a placement naming the restarted node")
                await eventually(lambda: _at(a_stub, newer.epoch), timeout=20,
                                 what="attention at the epoch with the restarted node")
                await _generates_through(a_stub, reborn, first)  # the restarted node

        run(body, timeout=150)
    finally:
        for p in (reborn, sched):
            if p is not None:
                p.stop()
        mesh.stop()


def test_expert_node_with_a_dead_data_path_is_quarantined_then_planned_back(model_dir, redis_url,
                                                                         tmp_path):
    # Both expert nodes hold every expert. expert-1's process is stopped (SIGSTOP) while its
    # registration goes on heartbeating for it: its lease holds and its data path is dead, as
    # when a node's NIC or drain loop fails but its control plane lives. The replica times out
    # on it, routes around it and reports it down (relayed by its registration, as the replica's
    # own heartbeat does); the scheduler plans it out, then back in after the hold.
    mesh = LocalMesh.start(model_dir, [[0, 1, 2, 3], [0, 1, 2, 3]], attention_replicas=1,
                           attention_args=["--expert-timeout", "1", "--expert-readmit", "60"],
                           workdir=tmp_path)
    victim = mesh.experts[1]
    sched = None
    try:
        sched = _start_scheduler(model_dir, redis_url, tmp_path, "mesh-quarantine:",
                                 "--quarantine-after", "1", "--quarantine-hold", "4",
                                 "--metrics-port", "0")

        async def body():
            async with _attention_session(sched, mesh) as (regs, s_stub, a_stub):
                regs[-1].load_fn = lambda: a_stub.GetLoad(attention_pb2.GetLoadRequest(),
                                                          timeout=2)
                placement = await _place_on(regs, s_stub, a_stub, nodes=2)
                first = await _generate(a_stub)
                os.kill(victim.proc.pid, signal.SIGSTOP)
                try:
                    # Waits out the replica's timeout on the stopped node; served by the other
                    # replicas of its experts, or failed where the table had no other host.
                    req = attention_pb2.GenerateRequest(
                        request_id="while-stopped", prompt_token_ids=[1, 2, 3, 4],
                        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=3))
                    [ev async for ev in a_stub.Generate(req, timeout=60)]
                    out = await eventually(lambda: _complete(s_stub, placement.epoch, nodes=1),
                                           timeout=20, what="a placement without expert-1")
                    assert {h.node_id for r in out.experts for h in r.hosts} == {"expert-0"}
                    await eventually(lambda: _at(a_stub, out.epoch), timeout=10,
                                     what="attention at the quarantine epoch")
                    assert await _generate(a_stub) == first
                    load = await a_stub.GetLoad(attention_pb2.GetLoadRequest(), timeout=5)
                    assert list(load.expert_nodes_down) == []  # planned out: nothing to route
                    m = scrape_metrics(sched.info["metrics_port"])
                    assert m["megascale:scheduler_expert_nodes_quarantined"] == 1
                    assert m["megascale:scheduler_expert_quarantines_total"] == 1
                finally:
                    os.kill(victim.proc.pid, signal.SIGCONT)
                back = await eventually(lambda: _complete(s_stub, out.epoch, nodes=2),
                                        timeout=20, what="expert-1 planned back in")
                await eventually(lambda: _at(a_stub, back.epoch), timeout=10,
                                 what="attention at the epoch with expert-1")
                await _generates_through(a_stub, victim, first)  # it serves again
                m = scrape_metrics(sched.info["metrics_port"])
                assert m["megascale:scheduler_expert_nodes_quarantined"] == 0

        run(body, timeout=150)
    finally:
        if victim.alive():
            os.kill(victim.proc.pid, signal.SIGCONT)  # a failed test must not leave it stopped
        if sched is not None:
            sched.stop()
        mesh.stop()
