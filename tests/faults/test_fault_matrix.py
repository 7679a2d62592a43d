"""The fault matrix: under steady load, SIGKILL or SIGSTOP one process of each kind; every
request completes with the output the undisturbed mesh gave, and the recovery time is printed
(``pytest -s tests/faults``).

Recovered: every request that was in flight at the fault has completed, fresh ones complete
again, and no request in flight is older than ``STALL_S`` (none is held by the faulty
process). Recovery time: from the fault until every request in flight at that moment has
completed. A SIGSTOP is healed by SIGCONT only once recovered (the mesh routed around the
frozen process), unless the case says otherwise. The longest request latency around the fault
is printed too. The mesh and the load are in conftest.py; the cases share one mesh and run in
file order.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable

import pytest
from conftest import EXPERT_TIMEOUT, FaultMesh, Load

STALL_S = 3.0  # a request in flight longer than this is held by the fault
RESULTS: list[tuple[str, float, int, int]] = []  # (case, recovery s, requests, lost)


def run_fault(fm: FaultMesh, case: str, inject: Callable[[], None],
              heal: Callable[[], None] | None = None, heal_when: str = "recovered",
              heal_after_s: float = 0.0, fresh: int = 3, bound_s: float = 40.0,
              max_retries: int = 0, min_fault_s: float = 0.0) -> float:
    """Inject a fault under load, wait for recovery, heal, check every request.

    ``heal_when``: "recovered" (after the in-flight requests completed) or "after" (at
    ``heal_after_s``, whatever happened: a frozen process nobody can route around).
    ``max_retries``: client retries on the other gateway allowed (a dead gateway's
    connections). ``min_fault_s``: the fault lasts at least this long (recovered or not)."""
    with Load(fm) as load:
        time.sleep(0.5)  # steady state
        t0 = time.monotonic()
        inject()
        healed = heal is None
        deadline = t0 + bound_s
        while True:
            now = time.monotonic()
            with load._lock:
                before = [o for o in load.outcomes if o.start <= t0]
            oldest = load.oldest_in_flight()
            recovered = (len(before) >= 2 and load.completed_since(t0) >= fresh
                         and (oldest is None or oldest > t0 and now - oldest < STALL_S)
                         and now - t0 >= min_fault_s)
            if not healed and (heal_when == "after" and now - t0 >= heal_after_s
                               or heal_when == "recovered" and recovered):
                heal()
                healed = True
            if healed and recovered:
                break
            assert now < deadline, f"{case}: no recovery within {bound_s:g} s"
            time.sleep(0.05)
        outcomes = load.stop()
    before = [o for o in outcomes if o.start <= t0]
    recovery = max(o.end for o in before) - t0
    worst = max(o.end - o.start for o in outcomes if o.end >= t0)
    lost = [o for o in outcomes if not o.ok]
    retries = sum(o.retries for o in outcomes)
    RESULTS.append((case, recovery, len(outcomes), len(lost)))
    print(f"\nFAULT {case}: recovery {recovery:.2f} s, longest request {worst:.2f} s, "
          f"{len(outcomes)} requests, {len(lost)} lost, {retries} client retries on the "
          "other gateway")
    assert not lost, f"{case}: lost requests: {[(o.prompt, o.detail) for o in lost[:3]]}"
    assert retries <= max_retries, f"{case}: {retries} client retries"
    return recovery


def kill(fm: FaultMesh, name: str) -> Callable[[], None]:
    return lambda: os.kill(fm.pid(name), signal.SIGKILL)


def stop_cont(fm: FaultMesh, name: str) -> tuple[Callable[[], None], Callable[[], None]]:
    pid = fm.pid(name)
    return (lambda: os.kill(pid, signal.SIGSTOP)), (lambda: os.kill(pid, signal.SIGCONT))


def wait_epoch_after(fm: FaultMesh, epoch: int, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while fm.placement_epoch() <= epoch:
        assert time.monotonic() < deadline, "no new placement epoch"
        time.sleep(0.1)
    return fm.placement_epoch()


def settle(fm: FaultMesh, seconds: float = 0.5, quiet_s: float = 1.5,
           timeout_s: float = 30) -> None:
    """Let restarts and re-placements finish before the next case: every child alive and
    no new placement epoch for ``quiet_s`` (nodes re-register within a lease)."""
    time.sleep(seconds)
    deadline = time.monotonic() + timeout_s
    epoch, since = fm.placement_epoch(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, "the mesh did not settle"
        if fm.placement_epoch() != epoch or not all(c.alive() for c in fm.mesh.children):
            epoch, since = fm.placement_epoch(), time.monotonic()
        time.sleep(0.1)


# ---- expert nodes, one copy of each expert (elastic: the survivors load the lost ones) ----

def test_expert_node_sigkill_one_copy_survivors_load_its_experts(fault_mesh):
    """The killed node is kept down (out of supervision) so that only the survivor can serve
    its experts: the scheduler must have it load them. Then a fresh expert-0 joins again."""
    fm = fault_mesh
    victim = fm.remove("expert-0")
    run_fault(fm, "SIGKILL expert node (1 copy, elastic reload)",
              lambda: os.kill(victim.proc.pid, signal.SIGKILL))
    assert re.search(r"expert node expert-1 serves experts \[0, 1, 2, 3, 4, 5, 6, 7\]",
                     fm.scheduler_log()), "the survivor never took every expert"
    victim.proc.wait(10)
    fm.add_expert(0)
    settle(fm)


def test_expert_node_sigstop_one_copy(fault_mesh):
    fm = fault_mesh
    stop, cont = stop_cont(fm, "expert-1")
    run_fault(fm, "SIGSTOP expert node (1 copy, elastic reload)", stop, cont)
    settle(fm)


def test_elastic_pool_add_a_node_then_remove_one(fault_mesh):
    """A third --experts auto node joins (it is given a share of the experts) and a first
    one leaves (SIGTERM): no request is lost either way."""
    fm = fault_mesh
    epoch = fm.placement_epoch()
    run_fault(fm, "elastic: expert node added", lambda: fm.add_expert(2))
    wait_epoch_after(fm, epoch)
    assert re.search(r"expert node expert-2 serves experts \[\d", fm.scheduler_log())
    removed = fm.remove("expert-0")
    run_fault(fm, "elastic: expert node removed (SIGTERM)", lambda: removed.stop(10))
    settle(fm)


# ---- attention replicas (2), scheduler, Redis ----------------------------------------------

def test_attention_replica_sigkill(fault_mesh):
    run_fault(fault_mesh, "SIGKILL attention replica (1 of 2)", kill(fault_mesh, "attention-0"))
    settle(fault_mesh)


def test_attention_replica_sigstop(fault_mesh):
    """A frozen replica: new requests go to the other one once its lease lapses, and the
    gateways' watchdog ends their streams to it (no GetLoad answer), so the requests it held
    resume on the other replica; SIGCONT only once they completed."""
    stop, cont = stop_cont(fault_mesh, "attention-1")
    # frozen for 8 s: requests that reach it before its lease lapses must be taken off it
    run_fault(fault_mesh, "SIGSTOP attention replica (1 of 2, 8 s at least)", stop, cont,
              min_fault_s=8)
    settle(fault_mesh)


@pytest.mark.parametrize("role,name", [("scheduler", "scheduler"), ("redis", "Redis")])
def test_control_plane_sigkill_and_sigstop(fault_mesh, role, name):
    """The scheduler or Redis killed (restarted by the supervisor), then frozen for 3 s."""
    fm = fault_mesh
    run_fault(fm, f"SIGKILL {name}", kill(fm, role))
    settle(fm)
    stop, cont = stop_cont(fm, role)
    run_fault(fm, f"SIGSTOP {name} (SIGCONT after 3 s)", stop, cont, heal_when="after",
              heal_after_s=3)
    settle(fm)


# ---- gateways (2) --------------------------------------------------------------------------

def test_gateway_sigkill_clients_retry_on_the_other(fault_mesh):
    run_fault(fault_mesh, "SIGKILL gateway (1 of 2)", kill(fault_mesh, "gateway-0"),
              max_retries=4)
    settle(fault_mesh)


def test_gateway_sigstop(fault_mesh):
    """A frozen gateway holds its clients' requests until it resumes (SIGCONT after 3 s); the
    other gateway serves on meanwhile."""
    stop, cont = stop_cont(fault_mesh, "gateway-1")
    run_fault(fault_mesh, "SIGSTOP gateway (1 of 2, SIGCONT after 3 s)", stop, cont,
              heal_when="after", heal_after_s=3)
    settle(fault_mesh)


# ---- expert nodes with two copies of every expert (the scheduler restarted with them) ------

def test_expert_node_sigkill_and_sigstop_with_copies(fault_mesh):
    fm = fault_mesh
    role, args = fm.mesh._specs["scheduler"]
    i = args.index("--expert-replicas")
    fm.mesh._specs["scheduler"] = (role, [*args[:i + 1], "2", *args[i + 2:]])
    epoch = fm.placement_epoch()
    os.kill(fm.pid("scheduler"), signal.SIGKILL)  # comes back with --expert-replicas 2
    wait_epoch_after(fm, epoch, 60)
    settle(fm)
    run_fault(fm, "SIGKILL expert node (2 copies)", kill(fm, "expert-1"))
    settle(fm)
    stop, cont = stop_cont(fm, "expert-2")
    recovery = run_fault(fm, "SIGSTOP expert node (2 copies)", stop, cont)
    assert recovery < float(EXPERT_TIMEOUT) + 8
    print("\n| fault | recovery | requests | lost |\n|---|---|---|---|")
    for case, rec, n, lost in RESULTS:
        print(f"| {case} | {rec:.1f} s | {n} | {lost} |")
