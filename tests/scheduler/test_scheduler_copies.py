"""plan_copies: N copies of every expert on distinct nodes, spread evenly, sticky across
membership changes; elastic nodes host any expert, fixed nodes their own."""

from __future__ import annotations

import pytest

from services.scheduler.placement import ExpertNode, assigned, plan_copies

E = 8


def _elastic(name: str) -> ExpertNode:
    return ExpertNode(name, f"tcp://{name}:1", (), elastic=True)


def _counts(plan, names):
    return {n: len(assigned(plan, n)) for n in names}


@pytest.mark.parametrize(("nodes", "copies"), [(1, 1), (2, 1), (3, 1), (2, 2), (3, 2), (4, 3)])
def test_every_expert_gets_its_copies_on_distinct_nodes_evenly(nodes, copies):
    names = [f"e{i}" for i in range(nodes)]
    plan = plan_copies(E, [_elastic(n) for n in names], copies)
    assert plan.complete
    for hosts in plan.hosts:
        assert len(hosts) == copies and len(set(hosts)) == copies
    counts = _counts(plan, names)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert sum(counts.values()) == E * copies


def test_more_copies_than_nodes_is_capped_at_the_nodes():
    plan = plan_copies(E, [_elastic("a"), _elastic("b")], 3)
    assert all(hosts == ("a", "b") for hosts in plan.hosts)


def test_a_node_that_leaves_hands_only_its_experts_to_the_survivors():
    three = plan_copies(E, [_elastic(n) for n in "abc"], 1)
    two = plan_copies(E, [_elastic("a"), _elastic("b")], 1, three.hosts)
    assert two.complete
    for e, hosts in enumerate(three.hosts):
        if hosts != ("c",):
            assert two.hosts[e] == hosts, "an expert whose host stayed was moved"


def test_a_node_that_joins_takes_a_share_from_the_others_and_nothing_else_moves():
    two = plan_copies(E, [_elastic("a"), _elastic("b")], 1)
    three = plan_copies(E, [_elastic(n) for n in "abc"], 1, two.hosts)
    counts = _counts(three, "abc")
    assert max(counts.values()) - min(counts.values()) <= 1 and counts["c"] >= 2
    moved = [e for e in range(E) if three.hosts[e] != two.hosts[e]]
    assert all(three.hosts[e] == ("c",) for e in moved)


def test_fixed_nodes_only_host_their_own_experts():
    fixed = ExpertNode("f", "tcp://f:1", (0, 1, 2, 3))
    plan = plan_copies(E, [fixed, _elastic("x")], 2)
    for e, hosts in enumerate(plan.hosts):
        assert hosts == (("f", "x") if e < 4 else ("x",))


def test_fixed_nodes_alone_leave_unheld_experts_missing():
    plan = plan_copies(E, [ExpertNode("f", "tcp://f:1", (0, 1))], 2)
    assert plan.missing == (2, 3, 4, 5, 6, 7) and not plan.complete


def test_deterministic():
    nodes = [_elastic(n) for n in "cab"]
    assert plan_copies(E, nodes, 2) == plan_copies(E, list(reversed(nodes)), 2)
