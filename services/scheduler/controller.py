"""The scheduler's control loop: leases, expert load, placement publishing and pushing.

Every ``sweep_interval_s`` (lease/4) :meth:`Controller.tick`:
1. re-seeds Redis after a restart (epochs never go backwards, the last placement is put back);
2. removes nodes whose lease expired (membership epoch bump);
3. refreshes the autoscaling metrics from the load reports;
4. re-plans the expert placement (not within one lease of its start while nodes named by
   the placement it resumed from Redis are still registering again) when the set of expert
   nodes changed, or the set of nodes in quarantine (services/scheduler/quarantine.py:
   planned out while most attention replicas route around them though their lease holds;
   its state is stored in Redis when it changes and taken over at start); a complete plan that
   differs from the current one gets a new placement epoch, is stored in Redis, woken to
   WatchPlacement streams and pushed to every attention and expert node;
5. re-pushes to nodes that have not acknowledged the current epoch (new or unreachable ones).

Every ``stats_interval_s`` it polls ``Expert.GetStats`` and turns row-count deltas into a
per-expert load (rows/s, smoothed); a load change re-plans but publishes only when the max node
load drops by more than ``rebalance_threshold``. An incomplete plan (an expert with no live
host) is never published: the last complete placement stays in force, the gap is logged and
exported (``megascale:scheduler_placement_complete`` = 0), and GetPlacement says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import grpc

from megascale.v1 import attention_pb2_grpc, common_pb2, expert_pb2, expert_pb2_grpc
from services.common import auth
from services.scheduler.config import SchedulerConfig
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.placement import (
    ExpertNode,
    PlacementPlan,
    assigned,
    hosts_from_proto,
    plan_copies,
    plan_load,
    plan_placement,
    to_proto,
)
from services.scheduler.quarantine import Quarantine
from services.scheduler.state import REDIS_ERRORS, NodeRecord, RedisState

log = logging.getLogger("megascale.scheduler")

_PUSH_ROLES = (common_pb2.NODE_ROLE_ATTENTION, common_pb2.NODE_ROLE_EXPERT)
_REJECT_RETRY_S = 5.0  # before re-pushing an epoch a node refused
_EMA = 0.5  # weight of the newest window in the per-expert load


def _expert_nodes(records: list[NodeRecord]) -> list[ExpertNode]:
    return [ExpertNode(r.info.node_id, r.info.m2n_url, tuple(sorted(set(r.info.expert_ids))),
                       r.info.grpc_address, r.info.started_at_unix_s, r.info.elastic)
            for r in records if r.info.role == common_pb2.NODE_ROLE_EXPERT]


def _urls(placement: common_pb2.ExpertPlacement, field: str = "m2n_url") -> dict[str, Any]:
    """node id -> ``field`` of its ExpertHost entries (m2n_url, grpc_address or
    started_at_unix_s)."""
    return {h.node_id: getattr(h, field) for rep in placement.experts for h in rep.hosts}


class Controller:
    """Owns the placement in force and the loop that keeps nodes and Redis in step with it."""

    def __init__(self, config: SchedulerConfig, state: RedisState,
                 metrics: SchedulerMetrics) -> None:
        self.config = config
        self.state = state
        self.metrics = metrics
        self.current = common_pb2.ExpertPlacement(epoch=0, num_experts=config.num_experts)
        # Experts without a live host in the newest plan (all of them until a first plan).
        self.missing: tuple[int, ...] = tuple(range(config.num_experts))
        self.membership_epoch = 0
        self.expert_load: dict[int, float] = {}  # expert id -> rows/s (smoothed)
        self.acked: dict[str, int] = {}          # node id -> placement epoch it applied
        # node id -> (epoch it refused with INVALID_ARGUMENT, when to try it again): a refusal
        # may be transient (a replica still attaching), so it is retried, but slowly.
        self._rejected: dict[str, tuple[int, float]] = {}
        self._fingerprint: tuple | None = None
        # The live nodes as of the last tick, kept current by the Register/Heartbeat/
        # Deregister handlers: PickReplica reads them instead of Redis on every request.
        self._records: dict[str, NodeRecord] = {}
        self._records_at = float("-inf")
        self._noted: dict[str, float] = {}  # node id -> when a handler last changed its entry
        self._rows: dict[str, tuple[float, dict[int, int]]] = {}  # node -> (t, rows_by_expert)
        # elastic node id -> (its process start, the experts it last loaded for a plan)
        self._loaded: dict[str, tuple[float, tuple[int, ...]]] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._cond = asyncio.Condition()
        self._kick = asyncio.Event()
        self._lock = asyncio.Lock()  # one tick / re-plan at a time
        self._redis_down = False
        self._started = time.monotonic()
        self._resumed = False  # the placement in force was taken over from Redis at start
        self.quarantine = Quarantine(config.num_experts, config.quarantine_after_s,
                                     config.quarantine_hold_s, config.quarantine_max_hold_s)
        self._quarantine_saved = 0  # quarantine.changes last stored in Redis (-1: store again)

    # ---- placement in force -------------------------------------------------------------

    async def wait_placement(self, after_epoch: int) -> common_pb2.ExpertPlacement:
        """The placement in force once its epoch is > ``after_epoch`` (waits until then)."""
        async with self._cond:
            await self._cond.wait_for(lambda: self.current.epoch > after_epoch)
            return self.current

    async def _install(self, placement: common_pb2.ExpertPlacement) -> None:
        async with self._cond:
            self.current = placement
            self._cond.notify_all()

    def kick(self) -> None:
        """Run a tick now (a node joined or left)."""
        self._kick.set()

    # ---- the loop -----------------------------------------------------------------------

    async def start(self) -> None:
        """Pick up what a previous scheduler left in Redis (placement, epoch), if reachable."""
        try:
            stored = await self.state.load_placement()
            if stored is not None and stored.num_experts == self.config.num_experts:
                await self._install(stored)
                self._resumed = True
                self.missing = ()
                log.info("resuming placement epoch %d from Redis", stored.epoch)
            self.membership_epoch = await self.state.epoch()
            self.quarantine.adopt(await self.state.load_quarantine(), time.monotonic(),
                                  time.time())
            self._quarantine_saved = self.quarantine.changes
        except REDIS_ERRORS as exc:
            self._on_redis_error(exc)

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop`` is set; never raises on Redis or node failures."""
        next_stats = time.monotonic() + self.config.stats_interval_s
        while not stop.is_set():
            await self.tick()
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + self.config.stats_interval_s
                await self.poll_stats()
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_any(stop), self.config.sweep_interval_s)

    async def _wait_any(self, stop: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._kick.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    @property
    def redis_down(self) -> bool:
        """The last Redis operation failed (cleared by the next tick that reaches it)."""
        return self._redis_down

    def _on_redis_error(self, exc: BaseException) -> None:
        self.metrics.redis_errors.inc()
        self._quarantine_saved = -1  # Redis may come back empty: store the state again
        if not self._redis_down:
            log.error("Redis at %s is unreachable: %s", self.state.url, exc)
        self._redis_down = True

    async def tick(self) -> None:
        """One pass of the loop (module docstring); Redis errors are logged, not raised."""
        async with self._lock:
            try:
                self.membership_epoch, _ = await self.state.restore(self.membership_epoch,
                                                                    self.current)
                if self._redis_down:
                    log.info("Redis at %s is reachable again", self.state.url)
                    self._redis_down = False
                for node_id in await self.state.sweep():
                    log.info("node %s left (lease expired)", node_id)
                    self.metrics.expirations.inc()
                records = await self.read_nodes()
                self.membership_epoch = await self.state.epoch()
            except REDIS_ERRORS as exc:
                self._on_redis_error(exc)
                return
            self.metrics.epoch.set(self.membership_epoch)
            self.metrics.observe_nodes(records)
            live = {r.info.node_id for r in records}
            for d in (self.acked, self._rejected, self._rows, self._loaded):
                for n in [n for n in d if n not in live]:
                    del d[n]
            out = self.quarantine.update(records, time.monotonic())
            self.metrics.observe_quarantine(out, self.quarantine.total)
            if self.quarantine.changes != self._quarantine_saved:
                try:
                    await self.state.save_quarantine(
                        self.quarantine.export(time.monotonic(), time.time()))
                    self._quarantine_saved = self.quarantine.changes
                except REDIS_ERRORS as exc:
                    self._on_redis_error(exc)
            experts = [n for n in _expert_nodes(records) if n.node_id not in out]
            fp = tuple(sorted((n.node_id, n.m2n_url, n.expert_ids, n.started_at, n.elastic)
                              for n in experts))
            if fp != self._fingerprint and not self._settling(records):
                self._fingerprint = fp
                await self._replan(experts, force=True)
            await self._push(records)
            await self._close_unused({r.info.grpc_address for r in records})

    def _settling(self, records: list[NodeRecord]) -> bool:
        """Within one lease of this scheduler's start, while a node named by the placement
        it resumed from Redis has not registered again: the nodes whose leases lapsed while
        no scheduler ran are coming back, and a plan over the ones back so far would move
        experts for nothing."""
        if not self._resumed or time.monotonic() - self._started >= self.config.node_ttl_s:
            return False
        named = {h.node_id for rep in self.current.experts for h in rep.hosts}
        return not named <= {r.info.node_id for r in records}

    # ------------------------------------------------ the node view PickReplica reads
    async def read_nodes(self) -> list[NodeRecord]:
        """The live nodes as Redis holds them, taken into the view (and returned as merged
        there). What a handler noted
        while the read was under way is newer than the read, and kept (a Register or a
        Heartbeat that landed meanwhile, a Deregister)."""
        started = time.monotonic()
        records = await self.state.nodes()
        view = {r.info.node_id: r for r in records}
        for node_id, at in self._noted.items():
            if at >= started:
                if node_id in self._records:
                    view[node_id] = self._records[node_id]
                else:
                    view.pop(node_id, None)
        self._records, self._records_at = view, time.monotonic()
        self._noted = {n: at for n, at in self._noted.items() if at >= started}
        return sorted(view.values(), key=lambda r: r.info.node_id)  # as state.nodes() does

    def records(self, max_age_s: float) -> list[NodeRecord] | None:
        """The view, or None when it is older than ``max_age_s`` (ticks failing)."""
        if time.monotonic() - self._records_at > max_age_s:
            return None
        return list(self._records.values())

    def role_of(self, node_id: str) -> int | None:
        """The role the node registered with, as the view holds it (None: not in the view)."""
        rec = self._records.get(node_id)
        return None if rec is None else rec.info.role

    def note_register(self, info: common_pb2.NodeInfo) -> None:
        self._records[info.node_id] = NodeRecord(info, None)
        self._noted[info.node_id] = time.monotonic()

    def note_load(self, node_id: str, load: common_pb2.LoadReport) -> None:
        rec = self._records.get(node_id)
        if rec is not None:
            self._records[node_id] = NodeRecord(rec.info, load)
            self._noted[node_id] = time.monotonic()

    def note_leave(self, node_id: str) -> None:
        self._records.pop(node_id, None)
        self._noted[node_id] = time.monotonic()

    async def _replan(self, experts: list[ExpertNode], force: bool) -> None:
        cfg = self.config
        if cfg.expert_replicas > 1 or any(n.elastic for n in experts):
            plan = plan_copies(cfg.num_experts, experts, cfg.expert_replicas,
                               hosts_from_proto(self.current))
        else:
            plan = plan_placement(cfg.num_experts, experts, self.expert_load or None,
                                  cfg.replicate_hot)
        if not plan.complete:
            if not experts and plan.missing != self.missing:
                log.info("no expert node registered yet: no placement")
            elif plan.missing != self.missing:
                # ERROR once a complete placement existed (hosts were lost); while the first
                # expert nodes are still registering it is expected.
                level = logging.ERROR if self.current.epoch else logging.WARNING
                log.log(level, "placement incomplete: experts %s have no live host; keeping "
                        "placement epoch %d", list(plan.missing), self.current.epoch)
            self.missing = plan.missing
            self.metrics.observe_placement(plan, self.current.epoch)
            return
        self.missing = ()
        urls = {n.node_id: n.m2n_url for n in experts}
        addresses = {n.node_id: n.grpc_address for n in experts}
        started = {n.node_id: n.started_at for n in experts}
        published = _urls(self.current, "started_at_unix_s")
        # A node that restarted (even on the same addresses) has no reply links to the
        # replicas: only a new epoch naming its new process makes them attach to it again.
        same = (plan.hosts == hosts_from_proto(self.current)
                and all(_urls(self.current).get(n) == urls[n]
                        and published.get(n, 0.0) in (0.0, started[n])
                        for hs in plan.hosts for n in hs))
        if same:
            self.metrics.observe_placement(plan, self.current.epoch)
            return
        if not force and self.current.epoch:
            old = plan_load(hosts_from_proto(self.current), self.expert_load or None,
                            [n.node_id for n in experts])
            if plan.max_load >= (1 - cfg.rebalance_threshold) * old:
                return  # not worth a new epoch
        if not await self._load_assigned(plan, experts):
            self._fingerprint = None  # plan again at the next tick
            return
        await self._publish(plan, urls, addresses, floor=self.current.epoch, started=started)

    async def _load_assigned(self, plan: PlacementPlan, experts: list[ExpertNode]) -> bool:
        """Make every elastic node of ``plan`` load what it is assigned (``Expert.LoadExperts``)
        before any replica routes to it; False when one could not (the plan is not
        published; the next tick plans again, without a node whose lease has expired)."""
        todo = []
        for n in experts:
            ids = assigned(plan, n.node_id)
            if n.elastic and self._loaded.get(n.node_id) != (n.started_at, ids):
                todo.append((n, ids))
        if not todo:
            return True
        results = await asyncio.gather(*(self._load_one(n, ids) for n, ids in todo))
        return all(results)

    async def _load_one(self, node: ExpertNode, ids: tuple[int, ...]) -> bool:
        stub = expert_pb2_grpc.ExpertStub(self._channel(node.grpc_address))
        try:
            resp = await stub.LoadExperts(expert_pb2.LoadExpertsRequest(expert_ids=ids),
                                          timeout=self.config.load_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("expert node %s (%s) could not load experts %s: %s %s", node.node_id,
                        node.grpc_address, list(ids), exc.code().name, exc.details())
            self._loaded.pop(node.node_id, None)
            return False
        self._loaded[node.node_id] = (node.started_at, ids)
        log.info("expert node %s serves experts %s (loaded in %.2f s)", node.node_id,
                 list(resp.expert_ids), resp.load_seconds)
        return True

    async def _publish(self, plan: PlacementPlan, urls: dict[str, str],
                       addresses: dict[str, str], floor: int,
                       started: dict[str, float] | None = None) -> None:
        try:
            epoch = await self.state.next_placement_epoch(floor)
            placement = to_proto(plan, epoch, urls, addresses, started)
            await self.state.save_placement(placement)
        except REDIS_ERRORS as exc:
            self._on_redis_error(exc)
            return
        await self._install(placement)
        self.metrics.observe_placement(plan, epoch)
        log.info("placement epoch %d: max load %.3g, mean %.3g, %d hot replicas", epoch,
                 plan.max_load, plan.mean_load, plan.replicas)

    # ---- pushing ------------------------------------------------------------------------

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = auth.channel(address)
        return ch

    async def _close_unused(self, live_addresses: set[str]) -> None:
        for addr in [a for a in self._channels if a not in live_addresses]:
            await self._channels.pop(addr).close()

    async def _push(self, records: list[NodeRecord]) -> None:
        """UpdatePlacement to every attention/expert node that has not applied the epoch."""
        p = self.current
        if p.epoch == 0:
            return
        now = time.monotonic()

        def due(node_id: str) -> bool:
            refused_epoch, retry_at = self._rejected.get(node_id, (-1, 0.0))
            return refused_epoch != p.epoch or now >= retry_at

        targets = [r for r in records if r.info.role in _PUSH_ROLES
                   and self.acked.get(r.info.node_id, -1) < p.epoch and due(r.info.node_id)]
        if not targets:
            return
        results = await asyncio.gather(*(self._push_one(r, p) for r in targets))
        newest = max((a for a in results if a is not None), default=0)
        if newest > p.epoch:
            # A node holds a newer epoch than ours: Redis and this scheduler both lost state.
            # Re-issue the same table above it so nodes do not ignore it as stale.
            log.warning("a node is at placement epoch %d > ours (%d): re-issuing", newest,
                        p.epoch)
            plan = PlacementPlan(p.num_experts, hosts_from_proto(p), (), ())
            await self._publish(plan, _urls(p), _urls(p, "grpc_address"), floor=newest,
                                started=_urls(p, "started_at_unix_s"))

    async def _push_one(self, rec: NodeRecord, p: common_pb2.ExpertPlacement) -> int | None:
        node = rec.info.node_id
        if rec.info.role == common_pb2.NODE_ROLE_EXPERT:
            stub = expert_pb2_grpc.ExpertStub(self._channel(rec.info.grpc_address))
        else:
            stub = attention_pb2_grpc.AttentionStub(self._channel(rec.info.grpc_address))
        try:
            resp = await stub.UpdatePlacement(p, timeout=self.config.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                retry = time.monotonic() + _REJECT_RETRY_S
                self._rejected[node] = (p.epoch, retry)
                self.metrics.pushes.labels(result="rejected").inc()
                log.error("node %s rejected placement epoch %d: %s", node, p.epoch,
                          exc.details())
            else:
                self.metrics.pushes.labels(result="error").inc()
                log.warning("push of placement epoch %d to %s (%s) failed: %s %s", p.epoch,
                            node, rec.info.grpc_address, exc.code().name, exc.details())
            return None
        self.acked[node] = resp.applied_epoch
        self.metrics.pushes.labels(result="ok").inc()
        return resp.applied_epoch

    # ---- expert load --------------------------------------------------------------------

    async def poll_stats(self) -> None:
        """Poll Expert.GetStats and fold row-count deltas into ``expert_load``; re-plan."""
        async with self._lock:
            try:
                records = await self.state.nodes()
            except REDIS_ERRORS as exc:
                self._on_redis_error(exc)
                return
            experts = [r for r in records if r.info.role == common_pb2.NODE_ROLE_EXPERT]
            if not experts:
                return
            stats = await asyncio.gather(*(self._stats_one(r) for r in experts))
            window: dict[int, float] = {}
            now = time.monotonic()
            for rec, st in zip(experts, stats, strict=True):
                if st is None:
                    continue
                rows = {int(k): int(v) for k, v in st.rows_by_expert.items()}
                prev = self._rows.get(rec.info.node_id)
                self._rows[rec.info.node_id] = (now, rows)
                if prev is None:
                    continue
                dt = max(1e-3, now - prev[0])
                for e, v in rows.items():
                    old = prev[1].get(e, 0)
                    delta = v - old if v >= old else v  # counter reset: the node restarted
                    window[e] = window.get(e, 0.0) + delta / dt
            if sum(window.values()) <= 0 or self._settling(records):
                return  # no traffic in this window: nothing new to learn
            for e in range(self.config.num_experts):
                rate = window.get(e, 0.0)
                old = self.expert_load.get(e)
                self.expert_load[e] = rate if old is None else _EMA * rate + (1 - _EMA) * old
            out = self.quarantine.quarantined()
            await self._replan([n for n in _expert_nodes(records) if n.node_id not in out],
                               force=False)
            await self._push(records)

    async def _stats_one(self, rec: NodeRecord) -> expert_pb2.ExpertStats | None:
        stub = expert_pb2_grpc.ExpertStub(self._channel(rec.info.grpc_address))
        try:
            return await stub.GetStats(expert_pb2.GetStatsRequest(),
                                       timeout=self.config.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.debug("GetStats of %s failed: %s", rec.info.node_id, exc.code().name)
            return None
