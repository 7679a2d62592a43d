"""Unit tests of the quarantine policy (services/scheduler/quarantine.py) over small record
factories; the end-to-end loop with real processes is in test_scheduler_mesh.py."""

from __future__ import annotations

import pytest
from sched_helpers import attention_info, expert_info

from megascale.v1 import common_pb2
from services.errors import ConfigError
from services.scheduler.config import SchedulerConfig
from services.scheduler.quarantine import Quarantine
from services.scheduler.state import NodeRecord


def cluster(down: list[list[str]], experts: dict[str, list[int]] | None = None
            ) -> list[NodeRecord]:
    """Expert nodes e0, e1 (each holding all 4 experts unless ``experts`` says otherwise) and
    one attention replica per entry of ``down``, reporting those nodes down."""
    experts = experts or {"e0": [0, 1, 2, 3], "e1": [0, 1, 2, 3]}
    recs = [NodeRecord(expert_info(n, 7000 + 2 * i, ids), None)
            for i, (n, ids) in enumerate(experts.items())]
    recs += [NodeRecord(attention_info(f"a{i}", 8000 + i),
                        common_pb2.LoadReport(expert_nodes_down=d)) for i, d in enumerate(down)]
    return recs


def make(after: float = 2.0, hold: float = 10.0, max_hold: float = 35.0) -> Quarantine:
    return Quarantine(4, after, hold, max_hold)


def test_quarantined_after_reports_hold_then_released():
    q = make()
    assert q.update(cluster([["e1"]]), 0.0) == frozenset()   # suspect from t=0
    assert q.update(cluster([["e1"]]), 1.9) == frozenset()
    assert q.update(cluster([["e1"]]), 2.0) == {"e1"}       # reported for after_s
    assert q.update(cluster([[]]), 11.9) == {"e1"}          # held (out of the placement: no
    assert q.update(cluster([[]]), 12.0) == frozenset()     # reports) until released
    assert q.total == 1


def test_a_break_in_the_reports_restarts_the_clock():
    q = make()
    q.update(cluster([["e1"]]), 0.0)
    q.update(cluster([[]]), 1.0)
    assert q.update(cluster([["e1"]]), 2.5) == frozenset()
    assert q.update(cluster([["e1"]]), 4.5) == {"e1"}


def test_hold_doubles_per_repeat_up_to_the_cap_and_is_forgiven_after_a_clean_spell():
    q = make()
    t, holds = 0.0, []
    for _ in range(4):  # reported again as soon as it is back
        q.update(cluster([["e1"]]), t)
        t += 2.0
        assert q.update(cluster([["e1"]]), t) == {"e1"}
        start = t
        while q.update(cluster([[]]), t):
            t += 0.5
        holds.append(t - start)
    assert holds == [10.0, 20.0, 35.0, 35.0]
    # clean for max_hold after the release: the next quarantine is a first one again
    q.update(cluster([[]]), t + 35.0)
    q.update(cluster([["e1"]]), t + 35.0)
    assert q.update(cluster([["e1"]]), t + 37.0) == {"e1"}
    assert q.update(cluster([[]]), t + 46.5) == {"e1"}
    assert q.update(cluster([[]]), t + 47.0) == frozenset()


def test_needs_a_majority_of_reporting_replicas():
    q = make()
    half = [["e1"], []]                    # 1 of 2 replicas: its own link may be the problem
    q.update(cluster(half), 0.0)
    assert q.update(cluster(half), 5.0) == frozenset()
    most = [["e1"], ["e1"], []]
    q.update(cluster(most), 5.0)
    assert q.update(cluster(most), 7.0) == {"e1"}


def test_never_leaves_an_expert_without_a_host():
    only = {"e0": [0, 1], "e1": [2, 3]}    # e1 alone holds experts 2 and 3
    q = make()
    q.update(cluster([["e1"]], only), 0.0)
    assert q.update(cluster([["e1"]], only), 5.0) == frozenset()
    both = [["e0", "e1"]]                  # both suspect: only one of them may go
    q = make()
    q.update(cluster(both), 0.0)
    assert len(q.update(cluster(both), 5.0)) == 1


def test_departed_node_is_forgotten_and_off_switch():
    q = make()
    q.update(cluster([["e1"]]), 0.0)
    assert q.update(cluster([["e1"]]), 2.0) == {"e1"}
    assert q.update(cluster([[]], {"e0": [0, 1, 2, 3]}), 3.0) == frozenset()  # e1 left
    off = make(after=0.0)
    off.update(cluster([["e1"]]), 0.0)
    assert off.update(cluster([["e1"]]), 100.0) == frozenset()


def test_exported_state_carries_over_to_a_new_process_clock():
    """A restarted scheduler has another monotonic clock: the deadline, strikes and release
    travel on the wall clock and land where they were."""
    q = make()
    q.update(cluster([["e1"]]), 100.0)
    assert q.update(cluster([["e1"]]), 102.0) == {"e1"}      # held until 112, strike 1
    saved = q.export(now=105.0, wall=5000.0)                  # 7 s of its hold left
    assert saved == {"e1": {"until": 5007.0, "strikes": 1, "released_at": None}}
    q2 = make()
    before = q2.changes
    q2.adopt(saved, now=3.0, wall=5001.0)                     # 1 s later, new clock
    assert q2.changes > before
    assert q2.update(cluster([[]]), 8.9) == {"e1"}            # 6 s left: until 9.0
    assert q2.update(cluster([[]]), 9.0) == frozenset()
    q2.update(cluster([["e1"]]), 9.0)                         # reported again at once:
    assert q2.update(cluster([["e1"]]), 11.0) == {"e1"}       # the second hold is doubled
    assert q2.export(now=11.0, wall=0.0)["e1"] == {"until": 20.0, "strikes": 2,
                                                   "released_at": None}


def test_unreadable_saved_entries_are_skipped():
    q = make()
    q.adopt({"e0": {"until": "soon"}, "e1": "junk", "e2": {"strikes": -3},
             "e3": {"until": None, "strikes": 2, "released_at": 10.0}}, now=0.0, wall=0.0)
    assert q.export(now=0.0, wall=0.0) == {"e3": {"until": None, "strikes": 2,
                                                  "released_at": 10.0}}


@pytest.mark.parametrize("field,value", [("quarantine_after_s", -1.0),
                                         ("quarantine_hold_s", 0.0),
                                         ("quarantine_max_hold_s", 5.0)])
def test_quarantine_settings_are_validated(field, value):
    with pytest.raises(ConfigError, match="quarantine"):
        SchedulerConfig(redis_url="redis://127.0.0.1:6379/0", num_experts=4,
                        **{"quarantine_hold_s": 30.0, field: value})
