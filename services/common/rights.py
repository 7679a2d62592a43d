"""Who may call what on the internal gRPC plane: the rights of each role.

An internal call is made by one of :data:`ROLES`, proven by its credential
(services/common/auth.py: an mTLS client certificate naming the role, or a role credential
derived from the cluster token). :data:`RIGHTS` names, per method, the roles it accepts; any
other caller gets PERMISSION_DENIED. A method not listed accepts no role at all (a new RPC must
be given its rights here; tests/security checks that every internal RPC is listed).

``admin`` is an operator's credential: it reads state, drains and removes nodes, and may
generate, but it cannot join the deployment or move the placement.
"""

from __future__ import annotations

from types import MappingProxyType

ROLES = ("scheduler", "attention", "expert", "gateway", "admin")

_NODES = frozenset({"attention", "expert"})

RIGHTS: MappingProxyType[str, frozenset[str]] = MappingProxyType({
    # membership: a node speaks for itself (the handler also checks NodeInfo.role / ownership)
    "/megascale.v1.Scheduler/Register": _NODES,
    "/megascale.v1.Scheduler/Heartbeat": _NODES,
    "/megascale.v1.Scheduler/Deregister": _NODES | {"scheduler", "admin"},
    # routing and placement reads
    "/megascale.v1.Scheduler/PickReplica": frozenset({"gateway", "admin"}),
    "/megascale.v1.Scheduler/GetPlacement": _NODES | {"scheduler", "admin"},
    "/megascale.v1.Scheduler/WatchPlacement": _NODES | {"scheduler", "admin"},
    "/megascale.v1.Scheduler/GetSettings": _NODES | {"gateway", "scheduler", "admin"},
    # an attention replica's front (the gateway) and its placement (the scheduler only)
    "/megascale.v1.Attention/Generate": frozenset({"gateway", "admin"}),
    "/megascale.v1.Attention/GenerateStream": frozenset({"gateway", "admin"}),
    "/megascale.v1.Attention/Abort": frozenset({"gateway", "admin"}),
    "/megascale.v1.Attention/GetLoad": frozenset({"scheduler", "gateway", "admin"}),
    "/megascale.v1.Attention/UpdatePlacement": frozenset({"scheduler"}),
    # an expert node: replicas attach; the scheduler places and drains
    "/megascale.v1.Expert/Attach": frozenset({"attention"}),
    "/megascale.v1.Expert/GetStats": frozenset({"scheduler", "attention", "admin"}),
    "/megascale.v1.Expert/UpdatePlacement": frozenset({"scheduler"}),
    "/megascale.v1.Expert/Drain": frozenset({"scheduler", "admin"}),
    # an elastic node loads the experts the scheduler assigns it (what it holds is placement)
    "/megascale.v1.Expert/LoadExperts": frozenset({"scheduler"}),
})

# Open to any caller, with or without a credential: liveness and readiness probes.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
# Open to any authenticated caller: service discovery.
ANY_ROLE_PREFIXES = ("/grpc.reflection.",)


def is_open(method: str) -> bool:
    return method.startswith(OPEN_PREFIXES)


def allowed(method: str, role: str) -> bool:
    """Whether ``role`` may call the full gRPC ``method`` name."""
    if method.startswith(ANY_ROLE_PREFIXES):
        return role in ROLES
    return role in RIGHTS.get(method, ())
