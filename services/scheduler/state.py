"""Membership, loads and the placement table, kept in Redis.

Keys (all under the cluster's prefix ``P``, so several clusters can share a Redis)::

    P node:<id>          hash, TTL = the lease: info (NodeInfo bytes), addr, role,
                         load (LoadReport bytes), pe (placement epoch the node last heard of)
    P members            set of node ids that joined and were not yet seen leaving
    P epoch              membership epoch: INCR on every join and every leave
    P placement          the last complete ExpertPlacement (bytes)
    P placement_epoch    the placement epoch counter
    P quarantine         JSON: expert nodes' quarantine state (services/scheduler/quarantine.py),
                         so a restarted scheduler keeps a broken node out for its hold

A node whose ``node:<id>`` key expired has left: :meth:`RedisState.sweep` finds ids in
``members`` without a key, removes them and bumps the epoch. Every multi-key update is one Lua
script, so a join racing a sweep never loses an epoch bump. After a Redis restart (empty
database) :meth:`RedisState.restore` puts the epochs back to at least what the scheduler had
seen, so epochs stay monotonic for the nodes; nodes come back by re-registering (their
Heartbeat gets NOT_FOUND).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from megascale.v1 import common_pb2

log = logging.getLogger("megascale.scheduler.state")

_REGISTER = """
local addr = redis.call('HGET', KEYS[1], 'addr')
if addr and addr ~= ARGV[3] then return -1 end
local old = redis.call('HGET', KEYS[1], 'info')
redis.call('HSET', KEYS[1], 'info', ARGV[2], 'addr', ARGV[3], 'role', ARGV[4])
redis.call('HDEL', KEYS[1], 'load', 'pe')
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local added = redis.call('SADD', KEYS[2], ARGV[1])
if added == 1 or old ~= ARGV[2] then return redis.call('INCR', KEYS[3]) end
return tonumber(redis.call('GET', KEYS[3]) or '0')
"""

_HEARTBEAT = """
local e = tonumber(redis.call('GET', KEYS[2]) or '0')
if redis.call('PEXPIRE', KEYS[1], ARGV[2]) == 0 then return {-1, e} end
local pe = redis.call('HGET', KEYS[1], 'pe')
redis.call('HSET', KEYS[1], 'load', ARGV[1], 'pe', ARGV[3])
if pe == ARGV[3] then return {0, e} end
return {1, e}
"""

_DEREGISTER = """
local d = redis.call('DEL', KEYS[1])
local s = redis.call('SREM', KEYS[2], ARGV[1])
local e = tonumber(redis.call('GET', KEYS[3]) or '0')
if s == 1 or d == 1 then e = redis.call('INCR', KEYS[3]) end
if d == 0 then return -1 end
return e
"""

_EXPIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('SREM', KEYS[2], ARGV[1]) == 0 then return 0 end
return redis.call('INCR', KEYS[3])
"""

_NEXT_EPOCH = """
local v = tonumber(redis.call('GET', KEYS[1]) or '0')
local f = tonumber(ARGV[1])
if f > v then v = f end
v = v + 1
redis.call('SET', KEYS[1], v)
return v
"""

_RESTORE = """
local out = {}
for i = 1, 2 do
  local v = tonumber(redis.call('GET', KEYS[i]) or '0')
  local f = tonumber(ARGV[i])
  if f > v then redis.call('SET', KEYS[i], f); v = f end
  out[i] = v
end
if ARGV[3] ~= '' then redis.call('SETNX', KEYS[3], ARGV[3]) end
return out
"""

# What callers catch to answer UNAVAILABLE ("Redis is unreachable").
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class AlreadyRegistered(Exception):
    """Register of a node_id held by a live node with a different address."""


@dataclass(frozen=True)
class NodeRecord:
    """A live node: what it registered and its last load report (None before the first)."""

    info: common_pb2.NodeInfo
    load: common_pb2.LoadReport | None


class RedisState:
    """Async access to the scheduler's Redis keys (module docstring). One per process."""

    def __init__(self, url: str, prefix: str, ttl_s: float, timeout_s: float = 1.0) -> None:
        self.url = url
        self.prefix = prefix
        self.ttl_ms = max(1, int(ttl_s * 1000))
        # Short timeouts: a dead Redis turns into UNAVAILABLE fast instead of hanging callers;
        # a couple of quick retries ride over the first stale connection after a restart.
        self.r = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError], health_check_interval=5)
        self._register = self.r.register_script(_REGISTER)
        self._heartbeat = self.r.register_script(_HEARTBEAT)
        self._deregister = self.r.register_script(_DEREGISTER)
        self._expire = self.r.register_script(_EXPIRE)
        self._next_epoch = self.r.register_script(_NEXT_EPOCH)
        self._restore = self.r.register_script(_RESTORE)

    def key(self, name: str) -> str:
        return self.prefix + name

    def node_key(self, node_id: str) -> str:
        return self.prefix + "node:" + node_id

    async def close(self) -> None:
        await self.r.aclose()

    async def ping(self) -> bool:
        return bool(await self.r.ping())

    async def register(self, info: common_pb2.NodeInfo) -> int:
        """Start (or refresh) the node's lease; returns the membership epoch.

        The epoch is bumped when the node joins or re-joins with a different NodeInfo.
        Raises :class:`AlreadyRegistered` when a live node holds the id at another address.
        """
        epoch = await self._register(
            keys=[self.node_key(info.node_id), self.key("members"), self.key("epoch")],
            args=[info.node_id, info.SerializeToString(), info.grpc_address, int(info.role),
                  self.ttl_ms])
        if epoch == -1:
            raise AlreadyRegistered(info.node_id)
        return int(epoch)

    async def heartbeat(self, node_id: str, load: common_pb2.LoadReport,
                        placement_epoch: int) -> tuple[bool, bool, int]:
        """Renew the lease and store the load: ``(found, placement_changed, epoch)``.

        ``placement_changed`` is True when ``placement_epoch`` differs from the one this node
        was told at its previous heartbeat (always on the first one).
        """
        res, epoch = await self._heartbeat(keys=[self.node_key(node_id), self.key("epoch")],
                                           args=[load.SerializeToString(), self.ttl_ms,
                                                 str(placement_epoch)])
        return res != -1, res == 1, int(epoch)

    async def deregister(self, node_id: str) -> int | None:
        """Remove the node now; the new epoch, or None when it was not registered."""
        res = await self._deregister(
            keys=[self.node_key(node_id), self.key("members"), self.key("epoch")],
            args=[node_id])
        return None if res == -1 else int(res)

    async def sweep(self) -> list[str]:
        """Remove members whose lease expired (one epoch bump each); returns their ids."""
        members = sorted(m.decode() for m in await self.r.smembers(self.key("members")))
        if not members:
            return []
        async with self.r.pipeline(transaction=False) as pipe:
            for m in members:
                pipe.exists(self.node_key(m))
            alive = await pipe.execute()
        gone = []
        for m, a in zip(members, alive, strict=True):
            if not a and await self._expire(
                    keys=[self.node_key(m), self.key("members"), self.key("epoch")], args=[m]):
                gone.append(m)
        return gone

    async def nodes(self) -> list[NodeRecord]:
        """Every live node with its last load report, sorted by node id."""
        members = sorted(m.decode() for m in await self.r.smembers(self.key("members")))
        if not members:
            return []
        async with self.r.pipeline(transaction=False) as pipe:
            for m in members:
                pipe.hmget(self.node_key(m), "info", "load")
            rows = await pipe.execute()
        out = []
        for m, (info_b, load_b) in zip(members, rows, strict=True):
            if info_b is None:
                continue  # expired, not swept yet
            try:
                info = common_pb2.NodeInfo.FromString(info_b)
                load = common_pb2.LoadReport.FromString(load_b) if load_b else None
            except Exception:  # noqa: BLE001 - a foreign or corrupt value: skip, do not crash
                log.warning("ignoring unreadable record for node %s", m)
                continue
            out.append(NodeRecord(info, load))
        return out

    async def epoch(self) -> int:
        return int(await self.r.get(self.key("epoch")) or 0)

    async def next_placement_epoch(self, floor: int) -> int:
        """A new placement epoch, > every epoch handed out before and > ``floor``."""
        return int(await self._next_epoch(keys=[self.key("placement_epoch")], args=[floor]))

    async def save_placement(self, placement: common_pb2.ExpertPlacement) -> None:
        await self.r.set(self.key("placement"), placement.SerializeToString())

    async def load_placement(self) -> common_pb2.ExpertPlacement | None:
        raw = await self.r.get(self.key("placement"))
        if not raw:
            return None
        try:
            return common_pb2.ExpertPlacement.FromString(raw)
        except Exception:  # noqa: BLE001
            log.warning("ignoring unreadable placement in Redis")
            return None

    async def save_quarantine(self, saved: dict[str, dict]) -> None:
        await self.r.set(self.key("quarantine"), json.dumps(saved, sort_keys=True))

    async def load_quarantine(self) -> dict[str, dict]:
        """What :meth:`save_quarantine` stored ({} when absent or unreadable)."""
        raw = await self.r.get(self.key("quarantine"))
        if not raw:
            return {}
        try:
            saved = json.loads(raw)
        except ValueError:
            saved = None
        if not isinstance(saved, dict):
            log.warning("ignoring unreadable quarantine state in Redis")
            return {}
        return saved

    async def restore(self, epoch: int, placement: common_pb2.ExpertPlacement | None
                      ) -> tuple[int, int]:
        """Raise the epochs to at least what we saw and put back the placement if Redis lost
        it (restart); returns ``(membership epoch, placement epoch)`` now in Redis."""
        pe = placement.epoch if placement is not None else 0
        raw = placement.SerializeToString() if placement is not None and pe else b""
        e, p = await self._restore(
            keys=[self.key("epoch"), self.key("placement_epoch"), self.key("placement")],
            args=[epoch, pe, raw])
        return int(e), int(p)
