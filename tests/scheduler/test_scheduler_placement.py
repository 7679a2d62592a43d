"""Placement algorithm: coverage, min-max balance vs a naive assignment, hot-expert replicas."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.placement import (
    ExpertNode,
    hosts_from_proto,
    naive_placement,
    node_loads,
    normalise_load,
    plan_load,
    plan_placement,
    to_proto,
)


def _node(name: str, ids: list[int]) -> ExpertNode:
    return ExpertNode(name, f"tcp://{name}:1", tuple(ids))


def test_every_expert_covered_by_a_holder():
    nodes = [_node("a", [0, 1, 2]), _node("b", [2, 3, 4]), _node("c", [4, 5, 0])]
    plan = plan_placement(6, nodes)
    assert plan.complete and plan.missing == ()
    holders = {n.node_id: set(n.expert_ids) for n in nodes}
    for e, hosts in enumerate(plan.hosts):
        assert hosts, f"expert {e} has no host"
        assert all(e in holders[h] for h in hosts)


def test_missing_experts_are_reported_not_invented():
    plan = plan_placement(5, [_node("a", [0, 1]), _node("b", [1, 3])])
    assert not plan.complete
    assert plan.missing == (2, 4)
    assert plan.hosts[2] == () and plan.hosts[4] == ()


def test_min_max_beats_naive_first_holder():
    # Node "a" holds everything, "b" and "c" hold half each: first-holder puts all on "a".
    nodes = [_node("a", list(range(8))), _node("b", [0, 1, 2, 3]), _node("c", [4, 5, 6, 7])]
    naive = naive_placement(8, nodes)
    ids = [n.node_id for n in nodes]
    plan = plan_placement(8, nodes)
    assert plan_load(naive, None, ids) == 8.0
    assert plan.max_load < plan_load(naive, None, ids)
    assert plan.max_load == pytest.approx(8 / 3, abs=1.0)  # at most one expert above the mean


def test_skewed_load_heavy_experts_spread_out():
    # Two heavy experts that both nodes hold must land on different nodes.
    nodes = [_node("a", [0, 1, 2, 3]), _node("b", [0, 1, 2, 3])]
    plan = plan_placement(4, nodes, {0: 10.0, 1: 10.0, 2: 1.0, 3: 1.0})
    assert plan.hosts[0] != plan.hosts[1]
    assert plan.max_load == pytest.approx(11.0)


def test_hot_expert_gets_replicas_on_least_loaded_holders():
    nodes = [_node("a", [0, 1]), _node("b", [0, 2]), _node("c", [0, 3])]
    load = {0: 30.0, 1: 1.0, 2: 1.0, 3: 1.0}
    single = plan_placement(4, nodes, load, replicate_hot=0)
    hot = plan_placement(4, nodes, load, replicate_hot=2)
    assert len(single.hosts[0]) == 1 and single.max_load == pytest.approx(31.0)
    assert hot.hosts[0] == ("a", "b", "c")
    assert hot.replicas == 2
    assert hot.max_load == pytest.approx(11.0)
    # The budget is respected.
    assert plan_placement(4, nodes, load, replicate_hot=1).replicas == 1


def test_replicas_not_added_when_they_do_not_help():
    # Uniform load over disjoint nodes: nothing to gain, the budget stays unused.
    nodes = [_node("a", [0, 1]), _node("b", [2, 3]), _node("c", [0, 2])]
    plan = plan_placement(4, nodes, None, replicate_hot=5)
    baseline = plan_placement(4, nodes, None, replicate_hot=0)
    assert plan.max_load <= baseline.max_load
    assert plan.replicas <= 5


def test_uniform_when_load_unknown_or_zero():
    assert normalise_load(3, None) == [1.0, 1.0, 1.0]
    assert normalise_load(3, {0: 0.0}) == [1.0, 1.0, 1.0]
    assert normalise_load(3, [2.0]) == [2.0, 0.0, 0.0]


def test_proto_roundtrip():
    nodes = [_node("a", [0, 1]), _node("b", [1, 2])]
    plan = plan_placement(3, nodes, {1: 5.0, 0: 1.0, 2: 1.0}, replicate_hot=1)
    p = to_proto(plan, 7, {n.node_id: n.m2n_url for n in nodes})
    assert p.epoch == 7 and p.num_experts == 3
    assert [r.expert_id for r in p.experts] == [0, 1, 2]
    assert hosts_from_proto(p) == plan.hosts
    assert all(h.m2n_url == f"tcp://{h.node_id}:1" for r in p.experts for h in r.hosts)


_holders = st.integers(2, 12).flatmap(lambda e: st.tuples(
    st.just(e),
    st.lists(st.sets(st.integers(0, e - 1), min_size=1, max_size=e), min_size=1, max_size=6),
    st.lists(st.floats(0, 100, allow_nan=False), min_size=e, max_size=e),
    st.integers(0, 4)))


@settings(max_examples=150, deadline=None)
@given(_holders)
def test_property_coverage_balance_and_replica_budget(case):
    num_experts, holder_sets, load, budget = case
    nodes = [_node(f"n{i}", sorted(s)) for i, s in enumerate(holder_sets)]
    held = set().union(*holder_sets)
    plan = plan_placement(num_experts, nodes, load, replicate_hot=budget)
    ids = [n.node_id for n in nodes]
    # Coverage: exactly the experts nobody holds are missing; hosts always hold the expert.
    assert set(plan.missing) == set(range(num_experts)) - held
    for e, hosts in enumerate(plan.hosts):
        assert len(set(hosts)) == len(hosts)
        assert all(e in holder_sets[int(h[1:])] for h in hosts)
    assert plan.replicas <= budget
    # Load is conserved: node loads add up to the load of the covered experts.
    w = normalise_load(num_experts, load)
    total = sum(w[e] for e in held)
    assert sum(node_loads(plan.hosts, w, ids).values()) == pytest.approx(total, rel=1e-6,
                                                                         abs=1e-6)
    # Replicas never raise the max node load.
    no_rep = plan_placement(num_experts, nodes, load, replicate_hot=0)
    assert plan.max_load <= no_rep.max_load + 1e-6
    # When every node holds every expert, LPT is within one expert of the perfect split.
    if all(len(s) == num_experts for s in holder_sets):
        assert no_rep.max_load <= total / len(nodes) + max(w) + 1e-6
        assert no_rep.max_load <= plan_load(naive_placement(num_experts, nodes), load,
                                            ids) + 1e-6
