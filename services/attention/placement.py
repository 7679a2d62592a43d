"""How an attention replica follows the expert placement: attach to the expert nodes it names,
build the routing table from it, and install it in the engine.

At start the replica attaches (``Expert.Attach``) to every ``--expert-nodes`` address and
builds the first placement from what they report (:func:`attach_experts`); without
``--expert-nodes`` it takes the scheduler's placement and attaches to the nodes it names
(:func:`placement_from_scheduler`: an elastic expert pool). Later the scheduler
pushes newer epochs (``Attention.UpdatePlacement``, and the registration's poll):
:func:`adopt_placement` attaches first to nodes that joined since (expert scale-out) or
restarted, then hands the table to :meth:`Engine.set_placement`, which installs it when no lane
is mid-step. The engine's side of this is read through its methods only
(:meth:`Engine.placement`, :meth:`Engine.attached_nodes`, :meth:`Engine.nodes_down`,
:meth:`Engine.note_attached`).
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from megascale.v1 import (
    common_pb2,
    expert_pb2,
    expert_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from services.attention.config import AttentionConfig
from services.attention.engine import Engine
from services.attention.routing import ExpertNodeRoute, Placement
from services.common import auth
from services.errors import ConfigError

log = logging.getLogger("megascale.attention")

_LATE_ATTACH_S = 5.0  # an Attach made for a pushed placement (the RPC that pushed it waits)


async def adopt_placement(engine: Engine, p: common_pb2.ExpertPlacement,
                          attacher: ExpertAttacher | None) -> int:
    """Install a newer placement at the next step boundary; returns the epoch in force.

    ``attacher`` None: a colocated replica (services/attention/local_experts.py), which
    computes every expert itself; placements of expert nodes do not apply to it.

    Expert nodes the placement names that this replica is not attached to yet (nodes that
    joined later) are attached first, at the ``grpc_address`` the placement gives. Raises
    ValueError for a placement that is malformed or names a node that cannot be attached (the
    placement in force stays). Older epochs are ignored.
    """
    if attacher is None:
        return engine.placement.epoch
    async with attacher.lock:
        return await _adopt_locked(engine, p, attacher)


async def _adopt_locked(engine: Engine, p: common_pb2.ExpertPlacement,
                        attacher: ExpertAttacher) -> int:
    current = engine.placement
    started = {h.node_id: h.started_at_unix_s for rep in p.experts for h in rep.hosts}
    known = engine.attached_nodes()
    if p.epoch <= current.epoch:
        # The epoch in force (a replica attached at start learns it from the nodes): it
        # still tells which process of each node this replica attached to.
        if p.epoch == current.epoch:
            for node_id, t in started.items():
                if t and node_id in known:
                    attacher.started.setdefault(node_id, t)
        return current.epoch
    placement = placement_from_proto(p, current)
    down = engine.nodes_down()
    in_force = {n.node_id for n in current.nodes}
    addresses = {h.node_id: h.grpc_address for rep in p.experts for h in rep.hosts}
    for node in placement.nodes:
        new = node.node_id not in known
        seen = attacher.started.get(node.node_id, 0.0)
        restarted = bool(seen and started[node.node_id]) and seen != started[node.node_id]
        # A known node is attached again when it restarted (a new process, maybe on the same
        # addresses), moved (a new dispatch URL), comes back into the placement (its reply
        # link may have lapsed meanwhile) or this replica routes around it: a restarted node
        # has no reply link to us until then.
        if (not new and not restarted and known[node.node_id] == node.dispatch_url
                and node.node_id not in down and node.node_id in in_force):
            attacher.started.setdefault(node.node_id, started[node.node_id])
            continue
        try:
            resp = await _attach_node(attacher, p.epoch, node.node_id, addresses[node.node_id])
        except ValueError as exc:
            if new:  # a table naming a node we cannot reach is refused whole
                raise
            log.warning("re-attaching expert node %s failed (it stays routed around): %s",
                        node.node_id, exc)
            continue
        engine.note_attached(resp.node_id, resp.dispatch_url)
        attacher.started[resp.node_id] = started[node.node_id]
    engine.set_placement(placement)
    return p.epoch


async def _attach_node(attacher: ExpertAttacher, epoch: int, node_id: str, address: str
                       ) -> expert_pb2.AttachResponse:
    """``Expert.Attach`` at ``address``; ValueError when there is no address, the node cannot
    be reached, or it is not ``node_id``."""
    if not address:
        raise ValueError(f"placement epoch {epoch} names expert node {node_id}, which this "
                         "replica is not attached to, without its grpc_address")
    try:
        resp = await attacher.attach(address, timeout_s=_LATE_ATTACH_S)
    except ConfigError as exc:
        raise ValueError(f"placement epoch {epoch}: {exc}") from None
    if resp.node_id != node_id:
        raise ValueError(f"expert node at {address} is {resp.node_id!r}, the placement calls "
                         f"it {node_id!r}")
    return resp


async def adopt_logged(engine: Engine, p: common_pb2.ExpertPlacement,
                       attacher: ExpertAttacher | None) -> None:
    """:func:`adopt_placement` for callbacks: a refused placement is logged, not raised."""
    try:
        await adopt_placement(engine, p, attacher)
    except ValueError as exc:
        log.warning("ignoring placement: %s", exc)


def placement_from_proto(p: common_pb2.ExpertPlacement, current: Placement) -> Placement:
    """Group the per-expert host lists into per-node routes."""
    if p.num_experts != current.num_experts:
        raise ValueError(f"placement has num_experts {p.num_experts}, the model has "
                         f"{current.num_experts}")
    nodes: dict[str, tuple[str, list[int]]] = {}
    for rep in p.experts:
        for host in rep.hosts:
            nodes.setdefault(host.node_id, (host.m2n_url, []))[1].append(rep.expert_id)
    routes = tuple(ExpertNodeRoute(nid, url, tuple(sorted(ids)))
                   for nid, (url, ids) in sorted(nodes.items()))
    return Placement(p.epoch, routes, p.num_experts)


class ExpertAttacher:
    """Calls ``Expert.Attach`` for this replica: the node opens its reply link to
    ``reply_url`` and reports what it hosts. At start for ``--expert-nodes``; later for nodes
    a pushed placement names (expert scale-out)."""

    def __init__(self, node_id: str, sender_id: int, reply_url: str, num_experts: int) -> None:
        self.node_id = node_id
        self.sender_id = sender_id
        self.reply_url = reply_url
        self.num_experts = num_experts
        # One adoption at a time: the scheduler's push and the registration's poll may
        # deliver the same placement together, and a node must be attached once.
        self.lock = asyncio.Lock()
        # node id -> the start time of the process this replica attached to (0 = unknown:
        # attached from --expert-nodes, before any placement named it)
        self.started: dict[str, float] = {}
        # node id -> the libm2n sender id its replies come from (AttachResponse): a reply is
        # accepted only from the node its dispatch went to (attention/dispatch.py)
        self.reply_senders: dict[str, int] = {}

    async def attach(self, address: str, timeout_s: float = 30.0) -> expert_pb2.AttachResponse:
        """Raises ConfigError (one line) when the node cannot be reached or serves another
        model."""
        async with auth.channel(address) as channel:
            stub = expert_pb2_grpc.ExpertStub(channel)
            try:
                resp = await stub.Attach(expert_pb2.AttachRequest(
                    node_id=self.node_id, m2n_sender_id=self.sender_id,
                    reply_url=self.reply_url), timeout=timeout_s, wait_for_ready=True)
            except grpc.aio.AioRpcError as exc:
                raise ConfigError(f"cannot attach to expert node {address}: "
                                  f"{exc.code().name} {exc.details()}") from None
        if resp.num_experts != self.num_experts:
            raise ConfigError(f"expert node {address} serves a model with {resp.num_experts} "
                              f"experts, this replica's model has {self.num_experts}")
        self.reply_senders[resp.node_id] = resp.m2n_sender_id
        return resp


async def placement_from_scheduler(config: AttentionConfig, attacher: ExpertAttacher,
                                   timeout_s: float = 600.0, poll_s: float = 0.5
                                   ) -> tuple[Placement, common_pb2.ExpertPlacement]:
    """The first placement when no ``--expert-nodes`` are given: poll the scheduler's
    ``GetPlacement`` until it has a complete one (epoch > 0), and attach to every node it
    names. A node that cannot be attached (it died meanwhile) means asking again (a newer
    epoch leaves it out). ConfigError after ``timeout_s``."""
    assert config.scheduler
    deadline = asyncio.get_running_loop().time() + timeout_s
    last = ""
    async with auth.channel(config.scheduler) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        while True:
            try:
                p = await stub.GetPlacement(scheduler_pb2.GetPlacementRequest(), timeout=5)
                if p.epoch > 0:
                    placement = await _attach_all(p, attacher)
                    return placement, p
                last = f"no complete placement yet (epoch {p.epoch})"
            except grpc.aio.AioRpcError as exc:
                last = f"scheduler {config.scheduler}: {exc.code().name} {exc.details()}"
            except ValueError as exc:
                last = str(exc)
            if asyncio.get_running_loop().time() > deadline:
                raise ConfigError(f"no expert placement from the scheduler within "
                                  f"{timeout_s:g} s: {last}")
            log.info("waiting for the scheduler's expert placement: %s", last)
            await asyncio.sleep(poll_s)


async def _attach_all(p: common_pb2.ExpertPlacement, attacher: ExpertAttacher) -> Placement:
    """Attach to every node of ``p``; its routes (ValueError when one cannot be)."""
    if p.num_experts != attacher.num_experts:
        raise ValueError(f"the scheduler's placement has num_experts {p.num_experts}, this "
                         f"replica's model has {attacher.num_experts}")
    nodes: dict[str, tuple[str, float, list[int]]] = {}
    for rep in p.experts:
        for h in rep.hosts:
            nodes.setdefault(h.node_id, (h.grpc_address, h.started_at_unix_s, []))[2].append(
                rep.expert_id)
    routes = []
    for node_id, (address, started, ids) in sorted(nodes.items()):
        resp = await _attach_node(attacher, p.epoch, node_id, address)
        attacher.started[node_id] = started
        routes.append(ExpertNodeRoute(node_id, resp.dispatch_url, tuple(sorted(ids))))
    return Placement(p.epoch, tuple(routes), p.num_experts)


async def attach_experts(config: AttentionConfig, attacher: ExpertAttacher) -> Placement:
    """Attach to every expert node; the placement is what they report hosting."""
    routes, epochs = [], set()
    for address in config.expert_nodes:
        resp = await attacher.attach(address)
        routes.append(ExpertNodeRoute(resp.node_id, resp.dispatch_url, tuple(resp.expert_ids)))
        epochs.add(resp.epoch)
    if len(epochs) != 1:
        raise ConfigError(f"expert nodes disagree on the placement epoch: {sorted(epochs)}")
    try:
        return Placement(epochs.pop(), tuple(routes), attacher.num_experts)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
