"""The Scheduler gRPC service on a real Redis: leases and epochs, routing, placement, errors."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from metrics_helpers import scrape_metrics
from sched_helpers import (
    attention_info,
    eventually,
    expert_info,
    make_config,
    run,
    start_scheduler,
)

from megascale.v1 import common_pb2, scheduler_pb2
from services.scheduler.config import Settings
from services.scheduler.server import COMPLETE_KEY, MISSING_KEY


async def _code(coro) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await coro
    return ei.value.code(), ei.value.details()


async def _placement(stub) -> tuple[common_pb2.ExpertPlacement, dict[str, str]]:
    """GetPlacement and its trailing metadata (completeness)."""
    call = stub.GetPlacement(scheduler_pb2.GetPlacementRequest())
    p = await call
    return p, dict(await call.trailing_metadata())


def _hb(node_id: str, **load) -> scheduler_pb2.HeartbeatRequest:
    return scheduler_pb2.HeartbeatRequest(node_id=node_id, load=common_pb2.LoadReport(**load))


def test_register_heartbeat_expiry_bump_the_epoch(redis_url):
    async def body():
        s = await start_scheduler(make_config(redis_url, node_ttl_s=0.6))
        try:
            st = s.stub
            r1 = await st.Register(attention_info("att-1", 5001))
            assert r1.lease_ttl_s == pytest.approx(0.6) and r1.epoch >= 1
            r2 = await st.Register(attention_info("att-2", 5002))
            assert r2.epoch == r1.epoch + 1
            # Re-registering the same node with the same info is not a membership change.
            assert (await st.Register(attention_info("att-2", 5002))).epoch == r2.epoch
            # Same id, different address while alive: refused.
            code, msg = await _code(st.Register(attention_info("att-2", 5009)))
            assert code == grpc.StatusCode.ALREADY_EXISTS and "att-2" in msg
            hb = await st.Heartbeat(_hb("att-1", running=1))
            assert hb.epoch == r2.epoch
            # att-2 stops heartbeating: its lease expires and the epoch moves; att-1 stays.
            for _ in range(8):
                await st.Heartbeat(_hb("att-1"))
                await asyncio.sleep(0.15)
            after = (await st.Heartbeat(_hb("att-1"))).epoch
            assert after == r2.epoch + 1
            code, msg = await _code(st.Heartbeat(_hb("att-2")))
            assert code == grpc.StatusCode.NOT_FOUND and "Register again" in msg
            # Deregister: immediate leave, epoch bump; a second one is NOT_FOUND.
            d = await st.Deregister(scheduler_pb2.DeregisterRequest(node_id="att-1"))
            assert d.epoch == after + 1
            code, _ = await _code(st.Deregister(scheduler_pb2.DeregisterRequest(node_id="att-1")))
            assert code == grpc.StatusCode.NOT_FOUND
        finally:
            await s.close()

    run(body)


def test_pick_replica_least_loaded_exclude_and_errors(redis_url):
    async def body():
        s = await start_scheduler(make_config(redis_url, node_ttl_s=30))
        try:
            st = s.stub
            pick = scheduler_pb2.PickReplicaRequest
            code, msg = await _code(st.PickReplica(pick()))
            assert code == grpc.StatusCode.UNAVAILABLE and "no attention replica" in msg
            for i in range(3):
                await st.Register(attention_info(f"a{i}", 6000 + i))
            # An expert node is never picked.
            await st.Register(expert_info("e0", 6100, [0, 1, 2, 3]))
            await st.Heartbeat(_hb("a0", running=5, waiting=2, free_kv_blocks=10,
                                   reported_at_unix_s=1.0))
            await st.Heartbeat(_hb("a1", running=1, waiting=0, kv_usage=0.5,
                                   free_kv_blocks=10, reported_at_unix_s=1.0))
            await st.Heartbeat(_hb("a2", running=0, waiting=1, kv_usage=0.2,
                                   free_kv_blocks=1, reported_at_unix_s=1.0))
            # a1 and a2 tie on running+waiting; a2 has lower KV usage.
            r = await st.PickReplica(pick(prompt_tokens=4))
            assert (r.node_id, r.address) == ("a2", "127.0.0.1:6002")
            # The pick counts until a2's next report, so the next request goes to a1.
            assert (await st.PickReplica(pick(prompt_tokens=4))).node_id == "a1"
            await st.Heartbeat(_hb("a1", running=1, kv_usage=0.5, free_kv_blocks=10,
                                   reported_at_unix_s=2.0))
            await st.Heartbeat(_hb("a2", running=0, waiting=1, kv_usage=0.2,
                                   free_kv_blocks=1, reported_at_unix_s=2.0))
            assert (await st.PickReplica(pick(exclude_node_ids=["a2"]))).node_id == "a1"
            # a2 has 1 free block of 16 tokens: a 100-token prompt goes elsewhere.
            assert (await st.PickReplica(pick(prompt_tokens=100))).node_id == "a1"
            code, msg = await _code(st.PickReplica(pick(exclude_node_ids=["a0", "a1", "a2"])))
            assert code == grpc.StatusCode.UNAVAILABLE and "excluded" in msg
            code, msg = await _code(st.PickReplica(pick(prompt_tokens=10_000)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "10000" in msg
            code, msg = await _code(st.PickReplica(pick(model="other")))
            assert code == grpc.StatusCode.UNAVAILABLE and "other" in msg
            assert (await st.PickReplica(pick(model="demo"))).node_id in ("a0", "a1", "a2")
        finally:
            await s.close()

    run(body)


BAD_REGISTER = [
    (dict(node_id=""), "node_id"),
    (dict(node_id="bad id!"), "node_id"),
    (dict(role=common_pb2.NODE_ROLE_UNSPECIFIED), "role"),
    (dict(role=42), "role"),
    (dict(grpc_address=""), "grpc_address"),
    (dict(grpc_address="localhost"), "grpc_address"),
    (dict(grpc_address="h:0"), "grpc_address"),
    (dict(m2n_url="http://x"), "m2n_url"),
    (dict(kv_blocks=0), "kv_blocks"),
]


def test_bad_input_is_invalid_argument_naming_the_field(redis_url):
    async def body():
        s = await start_scheduler(make_config(redis_url))
        try:
            st = s.stub
            for change, field in BAD_REGISTER:
                info = attention_info("ok-id", 7000)
                for k, v in change.items():
                    setattr(info, k, v)
                code, msg = await _code(st.Register(info))
                assert code == grpc.StatusCode.INVALID_ARGUMENT, change
                assert field in msg, (change, msg)
            for ids, field in [([], "expert_ids"), ([0, 4], "out of range"),
                               ([1, 1], "unique")]:
                code, msg = await _code(st.Register(expert_info("e", 7100, ids)))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and field in msg, (ids, msg)
            code, msg = await _code(st.Register(expert_info("e", 7100, [0], m2n_url="")))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "m2n_url" in msg
            code, msg = await _code(st.Heartbeat(_hb("")))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "node_id" in msg
            await st.Register(attention_info("ok-id", 7000))
            code, msg = await _code(st.Heartbeat(_hb("ok-id", kv_usage=1.5)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "kv_usage" in msg
            code, msg = await _code(st.Heartbeat(_hb("ok-id", step_time_ms=float("nan"))))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "step_time_ms" in msg
            code, msg = await _code(st.Heartbeat(_hb("ok-id", expert_nodes_down=["bad id"])))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "expert_nodes_down" in msg
            code, msg = await _code(st.Heartbeat(_hb("ok-id",
                                                     expert_nodes_down=["e"] * 1025)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "more than 1024" in msg
            code, _ = await _code(st.Deregister(scheduler_pb2.DeregisterRequest(node_id="")))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await s.close()

    run(body)


def test_settings_at_register_and_get_settings(redis_url):
    async def body():
        cfg = make_config(redis_url, settings=Settings(micro_batches=3, max_batch_tokens=256,
                                                       max_running_requests=16,
                                                       dispatch_timeout_ms=500))
        s = await start_scheduler(cfg)
        try:
            got = await s.stub.GetSettings(scheduler_pb2.GetSettingsRequest())
            assert (got.micro_batches, got.max_batch_tokens, got.max_running_requests,
                    got.dispatch_timeout_ms) == (3, 256, 16, 500)
            reg = await s.stub.Register(attention_info("a", 7200))
            assert reg.settings == got
        finally:
            await s.close()

    run(body)


def test_placement_published_watched_and_kept_when_incomplete(redis_url):
    async def body():
        s = await start_scheduler(make_config(redis_url, node_ttl_s=30, metrics_port=0))
        try:
            st = s.stub
            watch = st.WatchPlacement(scheduler_pb2.WatchPlacementRequest(after_epoch=0))
            p0, md = await _placement(st)
            # No expert node yet: no placement, and every expert is reported missing.
            assert p0.epoch == 0 and md[COMPLETE_KEY] == "false"
            assert md[MISSING_KEY] == "0,1,2,3"
            # Only experts 0..2 are held: incomplete, nothing published, and GetPlacement says so.
            await st.Register(expert_info("e0", 7300, [0, 1, 2]))
            await eventually(lambda: s.sched.controller.missing == (3,), what="missing (3,)")
            p, md = await _placement(st)
            assert p.epoch == 0 and md[COMPLETE_KEY] == "false" and md[MISSING_KEY] == "3"
            # A second node completes it: epoch 1 on the stream, every expert covered.
            await st.Register(expert_info("e1", 7310, [2, 3]))
            first = await asyncio.wait_for(watch.read(), 10)
            assert first.epoch >= 1 and first.num_experts == 4
            assert [len(r.hosts) >= 1 for r in first.experts] == [True] * 4
            hosts = {r.expert_id: {h.node_id for h in r.hosts} for r in first.experts}
            assert hosts[3] == {"e1"} and hosts[0] == {"e0"}
            assert {h.m2n_url for r in first.experts for h in r.hosts if h.node_id == "e1"} \
                == {"tcp://127.0.0.1:7311"}
            p, md = await _placement(st)
            assert p == first and md[COMPLETE_KEY] == "true"
            # A third holder of expert 1 changes the table: the stream gets the next epoch.
            await st.Register(expert_info("e2", 7320, [0, 1]))
            second = await asyncio.wait_for(watch.read(), 10)
            assert second.epoch > first.epoch
            # e1 leaves: expert 3 has no host; the last complete table stays in force.
            await st.Deregister(scheduler_pb2.DeregisterRequest(node_id="e1"))
            await eventually(lambda: s.sched.controller.missing == (3,), what="missing again")
            p, md = await _placement(st)
            assert p == second and md[MISSING_KEY] == "3"
            m = scrape_metrics(s.sched.metrics_port)
            assert m["megascale:scheduler_placement_complete"] == 0
            assert m["megascale:scheduler_placement_epoch"] == second.epoch
            watch.cancel()
            # A watcher that already has the current epoch waits for a newer one only.
            w2 = st.WatchPlacement(scheduler_pb2.WatchPlacementRequest(after_epoch=second.epoch))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(w2.read(), 0.5)
            w2.cancel()
        finally:
            await s.close()

    run(body)


def test_autoscaling_metrics_from_load_reports(redis_url):
    async def body():
        s = await start_scheduler(make_config(redis_url, node_ttl_s=30, metrics_port=0))
        try:
            st = s.stub
            await st.Register(attention_info("a0", 7400))
            await st.Register(attention_info("a1", 7401))
            await st.Register(expert_info("e0", 7410, [0, 1, 2, 3]))
            await st.Register(expert_info("e1", 7411, [0, 1, 2, 3]))
            # a0 routes around e1 (its data path failed), and names a node that already left
            await st.Heartbeat(_hb("a0", waiting=3, kv_usage=0.5, attention_time_ms=8.0,
                                   expert_wait_ms=2.0, expert_nodes_down=["e1", "gone"]))
            await st.Heartbeat(_hb("a1", waiting=1, kv_usage=0.25, attention_time_ms=4.0,
                                   expert_wait_ms=4.0))
            await st.Heartbeat(_hb("e0", expert_queue_rows=50, tokens_per_s=100.0))

            def metrics_once(ok) -> dict[str, float] | None:  # noqa: ANN001 - for eventually
                m = scrape_metrics(s.sched.metrics_port)
                return m if ok(m) else None

            m = await eventually(lambda: metrics_once(lambda d: d.get(
                'megascale:scheduler_requests_waiting{role="attention"}') == 4),
                                 what="metrics refresh")
            assert m['megascale:scheduler_nodes{role="attention"}'] == 2
            assert m['megascale:scheduler_nodes{role="expert"}'] == 2
            # one series per live expert node: how many replicas report it down
            assert m['megascale:scheduler_expert_node_down_reports{node_id="e1"}'] == 1
            assert m['megascale:scheduler_expert_node_down_reports{node_id="e0"}'] == 0
            assert not any("gone" in k for k in m)
            await st.Deregister(scheduler_pb2.DeregisterRequest(node_id="e1"))
            key = 'megascale:scheduler_expert_node_down_reports{node_id="e1"}'
            m = await eventually(lambda: metrics_once(lambda d: key not in d),
                                 what="the departed node's series removed")
            assert m['megascale:scheduler_expert_node_down_reports{node_id="e0"}'] == 0
            assert m['megascale:scheduler_mean_requests_waiting{role="attention"}'] == 2
            assert m["megascale:scheduler_kv_usage_mean"] == pytest.approx(0.375)
            assert m["megascale:scheduler_kv_usage_max"] == pytest.approx(0.5)
            assert m["megascale:scheduler_ta_te_ratio"] == pytest.approx(6.0 / 3.0)
            assert m["megascale:scheduler_expert_queue_wait_seconds"] == pytest.approx(0.5)
            assert m["megascale:scheduler_membership_epoch"] >= 3
            assert m["megascale:scheduler_placement_epoch"] >= 1
        finally:
            await s.close()

    run(body)

