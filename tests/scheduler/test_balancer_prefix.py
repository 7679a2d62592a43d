"""Cache-aware routing in the balancer: prefix affinity while loads are balanced, load first
when they are not, and the routing hashes the gateway sends."""

from __future__ import annotations

from megascale.v1 import common_pb2
from services.core.prefix_hash import MAX_ROUTING_BLOCKS, ROUTING_BLOCK_SIZE, routing_keys
from services.scheduler.balancer import PREFIX_SLACK, Balancer, PrefixMap
from services.scheduler.state import NodeRecord


def _rec(node_id: str, busy: int = 0) -> NodeRecord:
    return NodeRecord(common_pb2.NodeInfo(node_id=node_id, role=common_pb2.NODE_ROLE_ATTENTION,
                                          grpc_address=f"{node_id}:1", kv_block_size=16),
                      common_pb2.LoadReport(running=busy, free_kv_blocks=1000,
                                            reported_at_unix_s=1.0))


def test_routing_keys_chain_the_prefix():
    a = routing_keys(list(range(40)))
    assert len(a) == 40 // ROUTING_BLOCK_SIZE
    assert routing_keys(list(range(32)) + [1, 2, 3]) == a  # the partial block has no key
    assert routing_keys([7] + list(range(1, 40)))[1] != a[1]  # a key names the whole prefix
    assert len(routing_keys(list(range(ROUTING_BLOCK_SIZE * (MAX_ROUTING_BLOCKS + 3))))) \
        == MAX_ROUTING_BLOCKS


def test_a_repeated_prefix_goes_back_to_its_replica():
    b = Balancer()
    recs = [_rec("a0"), _rec("a1")]
    long_a = routing_keys(list(range(100, 164)))
    long_b = routing_keys(list(range(300, 364)))
    first = b.pick(recs, prefix_hashes=long_a).info.node_id
    # least-loaded alone would now pick the other replica (one pick pending on `first`)
    other = b.pick(recs, prefix_hashes=long_b).info.node_id
    assert other != first
    for _ in range(3):
        assert b.pick(recs, prefix_hashes=long_a).info.node_id == first
        assert b.pick(recs, prefix_hashes=long_b).info.node_id == other
    # a prompt that shares only the first blocks still follows them
    branch = routing_keys(list(range(100, 132)) + list(range(900, 932)))
    assert b.pick(recs, prefix_hashes=branch).info.node_id == first
    assert b.prefix_routed == 7


def test_load_wins_over_affinity_beyond_the_slack():
    b = Balancer()
    keys = routing_keys(list(range(64)))
    b.prefixes.record("a0", keys)
    assert b.pick([_rec("a0", busy=PREFIX_SLACK), _rec("a1")], prefix_hashes=keys
                  ).info.node_id == "a0"
    b = Balancer()
    b.prefixes.record("a0", keys)
    assert b.pick([_rec("a0", busy=PREFIX_SLACK + 1), _rec("a1")], prefix_hashes=keys
                  ).info.node_id == "a1"
    # ... and a1 now holds the prefix as well (it will cache it)
    assert b.prefixes.match("a1", keys) == len(keys)


def test_prefix_map_is_bounded_lru_and_forgets_nodes():
    m = PrefixMap(capacity=4)
    m.record("a", [1, 2, 3])
    m.record("a", [9, 10])       # 1 is the least recently routed: dropped
    assert m.match("a", [1, 2]) == 0 and m.match("a", [2, 3, 4]) == 2
    m.record("b", [1])
    m.forget({"b"})
    assert m.match("a", [2]) == 0 and m.match("b", [1]) == 1
    m.forget_node("b")
    assert m.match("b", [1]) == 0
