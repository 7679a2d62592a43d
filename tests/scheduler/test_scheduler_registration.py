"""NodeRegistration against a real scheduler: heartbeats, placement delivery, Redis restart,
scheduler restart."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import grpc
import pytest
from sched_helpers import (
    attention_info,
    eventually,
    expert_info,
    make_config,
    run,
    start_scheduler,
)

from megascale.v1 import common_pb2, scheduler_pb2
from services.common.registration import NodeRegistration


def test_registration_heartbeats_load_and_delivers_placement_and_settings(redis_url):
    async def body():
        s = await start_scheduler(make_config(redis_url, node_ttl_s=0.6))
        placements: list[common_pb2.ExpertPlacement] = []
        settings: list[common_pb2.DeploymentSettings] = []
        busy = {"running": 9}

        async def on_placement(p):  # coroutine callbacks are awaited
            placements.append(p)

        regs = [
            NodeRegistration(s.sched.address, attention_info("a0", 8000),
                             load_fn=lambda: common_pb2.LoadReport(running=busy["running"]),
                             on_placement=on_placement, on_settings=settings.append),
            NodeRegistration(s.sched.address, attention_info("a1", 8001),
                             load_fn=lambda: common_pb2.LoadReport(running=1)),
            NodeRegistration(s.sched.address, expert_info("e0", 8100, [0, 1, 2, 3]),
                             load_fn=lambda: 1 / 0),  # a broken load_fn must not kill the loop
        ]
        try:
            for r in regs:
                await r.start()
            assert all([await r.wait_registered(10) for r in regs])
            assert settings and settings[0].micro_batches == 2
            # The expert node makes a complete placement; a0 gets it via its heartbeat.
            await eventually(lambda: placements and placements[-1].epoch >= 1, what="placement")
            assert regs[0].placement_epoch == placements[-1].epoch
            # Heartbeats carry load_fn's report: the less busy a1 is picked, then a0 once the
            # load flips. Leases stay alive over several TTLs.
            pick = scheduler_pb2.PickReplicaRequest()
            await eventually(lambda: regs[1].registrations == 1 and regs[0].epoch > 0)
            await asyncio.sleep(1.5)  # > 2 leases: heartbeats must keep the nodes alive
            assert [r.registrations for r in regs] == [1, 1, 1]
            assert (await s.stub.PickReplica(pick)).node_id == "a1"
            busy["running"] = 0

            async def picks_a0():
                return (await s.stub.PickReplica(pick)).node_id == "a0"

            await eventually(picks_a0, what="a0 picked after its load dropped")
            # A clean stop deregisters: the epoch moves at once.
            before = (await s.stub.Heartbeat(scheduler_pb2.HeartbeatRequest(node_id="a1"))).epoch
            await regs[1].stop()
            after = (await s.stub.Heartbeat(scheduler_pb2.HeartbeatRequest(node_id="a0"))).epoch
            assert after == before + 1
        finally:
            for r in regs:
                await r.stop()
            await s.close()

    run(body)


def test_survives_redis_restart_and_nodes_reregister(own_redis):
    async def body():
        cfg = make_config(own_redis.url, node_ttl_s=0.6)
        s = await start_scheduler(cfg)
        regs = [NodeRegistration(s.sched.address, attention_info("a0", 8200),
                                 max_backoff_s=0.3),
                NodeRegistration(s.sched.address, expert_info("e0", 8300, [0, 1, 2, 3]),
                                 max_backoff_s=0.3)]
        try:
            for r in regs:
                await r.start()
            assert all([await r.wait_registered(10) for r in regs])
            await eventually(lambda: s.sched.controller.current.epoch >= 1, what="placement")
            placement_before = s.sched.controller.current
            epoch_before = (await s.stub.Heartbeat(
                scheduler_pb2.HeartbeatRequest(node_id="a0"))).epoch

            own_redis.kill()
            # While Redis is down, requests are still placed (from the last view of the
            # nodes, well past the sweeps that keep it fresh) and the placement is served;
            # what needs Redis (a lease renewal) is a clear UNAVAILABLE, not a hang.
            await asyncio.sleep(3 * s.sched.config.sweep_interval_s)
            picked = await s.stub.PickReplica(scheduler_pb2.PickReplicaRequest(), timeout=10)
            assert picked.node_id == "a0"
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await s.stub.Heartbeat(scheduler_pb2.HeartbeatRequest(node_id="a0"),
                                       timeout=10)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Redis" in ei.value.details()
            p = await s.stub.GetPlacement(scheduler_pb2.GetPlacementRequest())
            assert p == placement_before
            await asyncio.sleep(1.0)

            own_redis.start()  # same port, empty database
            # Nodes get NOT_FOUND on Heartbeat and register again.
            await eventually(lambda: all(r.registrations >= 2 for r in regs), timeout=20,
                             what="re-registration after Redis restart")
            r = await s.stub.PickReplica(scheduler_pb2.PickReplicaRequest())
            assert r.node_id == "a0"
            # Epochs never go backwards for the nodes; the placement is back in Redis.
            hb = await s.stub.Heartbeat(scheduler_pb2.HeartbeatRequest(node_id="a0"))
            assert hb.epoch > epoch_before
            p = await s.stub.GetPlacement(scheduler_pb2.GetPlacementRequest())
            assert p.epoch >= placement_before.epoch
            assert await s.sched.state.load_placement() == s.sched.controller.current
        finally:
            for reg in regs:
                await reg.stop()
            await s.close()

    run(body)


def test_scheduler_restart_keeps_membership_and_placement(own_redis):
    async def body():
        cfg = make_config(own_redis.url, node_ttl_s=2.0)
        s = await start_scheduler(cfg)
        port = s.sched.port
        reg = NodeRegistration(s.sched.address, expert_info("e0", 8400, [0, 1, 2, 3]),
                               max_backoff_s=0.2)
        try:
            await reg.start()
            assert await reg.wait_registered(10)
            await eventually(lambda: s.sched.controller.current.epoch >= 1, what="placement")
            placement = s.sched.controller.current
            await s.close()
            # A new scheduler process-equivalent on the same port and Redis picks up the state.
            s = await start_scheduler(replace(cfg, grpc_port=port))
            assert s.sched.controller.current == placement
            await asyncio.sleep(1.0)
            # The node's lease lived on in Redis: no re-registration was needed.
            assert reg.registrations == 1
            hb = await s.stub.Heartbeat(scheduler_pb2.HeartbeatRequest(node_id="e0"))
            assert hb.epoch >= 1
            assert (await s.stub.GetPlacement(scheduler_pb2.GetPlacementRequest())) == placement
        finally:
            await reg.stop()
            await s.close()

    run(body)


def test_scheduler_restart_keeps_a_quarantined_node_out(own_redis):
    """A node quarantined by one scheduler stays planned out under the next one (its state is
    in Redis), though the new one alone would need 60 s of reports to quarantine it again."""

    def hosts(placement: common_pb2.ExpertPlacement) -> set[str]:
        return {h.node_id for r in placement.experts for h in r.hosts}

    async def body():
        cfg = make_config(own_redis.url, node_ttl_s=2.0, quarantine_after_s=0.3,
                          quarantine_hold_s=120.0, quarantine_max_hold_s=600.0)
        s = await start_scheduler(cfg)
        port = s.sched.port
        regs = [NodeRegistration(s.sched.address, expert_info(n, p, [0, 1, 2, 3]),
                                 max_backoff_s=0.2) for n, p in (("e0", 8500), ("e1", 8502))]
        regs.append(NodeRegistration(  # the one attention replica reports e1's data path dead
            s.sched.address, attention_info("a0", 8504), max_backoff_s=0.2,
            load_fn=lambda: common_pb2.LoadReport(expert_nodes_down=["e1"])))
        try:
            for reg in regs:
                await reg.start()
                assert await reg.wait_registered(10)
            ctl = s.sched.controller
            await eventually(lambda: ctl.quarantine.quarantined() == {"e1"}
                             and hosts(ctl.current) == {"e0"}, what="e1 quarantined")
            placement = ctl.current
            await s.close()
            s = await start_scheduler(replace(cfg, grpc_port=port, quarantine_after_s=60.0))
            ctl = s.sched.controller
            assert ctl.quarantine.quarantined() == {"e1"}  # adopted at start
            await asyncio.sleep(1.5)  # several ticks with e1's lease alive
            assert ctl.quarantine.quarantined() == {"e1"}
            assert hosts(ctl.current) == {"e0"} and ctl.current.epoch == placement.epoch
        finally:
            for reg in regs:
                await reg.stop()
            await s.close()

    run(body)
