"""ExpertPause: steps wait for lost experts, resume when the table is complete again, give up
after the bound and then fail at once until it is; a stale-epoch refusal waits for a newer
placement."""

from __future__ import annotations

import time

from services.attention.expert_pause import ExpertPause


def test_pause_then_resume_when_complete():
    p = ExpertPause(5.0)
    gave_up: list[str] = []
    assert p.pause(complete=False, why="experts [3] have no live replica")
    assert p.holding(complete=False, give_up=gave_up.append)
    assert not p.holding(complete=True, give_up=gave_up.append)
    assert p.since is None and p.pauses == 1 and p.last_pause_s >= 0 and not gave_up


def test_gives_up_after_the_bound_then_fails_fast_until_complete():
    p = ExpertPause(0.05)
    gave_up: list[str] = []
    assert p.pause(False, "experts [3] have no live replica")
    time.sleep(0.06)
    assert not p.holding(False, gave_up.append)
    assert gave_up and "experts [3]" in gave_up[0] and "--expert-wait" in gave_up[0]
    assert not p.pause(False, "again")  # no copy and no reload: fail fast
    assert not p.holding(True, gave_up.append)
    assert p.pause(False, "a new loss")  # complete once more: the next loss waits again


def test_a_refusal_with_a_complete_table_is_not_paused():
    assert not ExpertPause(5.0).pause(complete=True, why="node refused layer 0")


def test_waiting_off():
    assert not ExpertPause(0).pause(complete=False, why="lost")


def test_a_stale_epoch_refusal_waits_for_a_newer_placement():
    """A node at a newer placement refused the step (routed by epoch 8): its requests wait,
    even with a complete table, until the replica's placement is past epoch 8."""
    p = ExpertPause(5.0)
    gave_up: list[str] = []
    assert p.pause_stale(8, "stale placement epoch: the dispatch carries epoch 8")
    assert p.holding(True, gave_up.append, epoch=8)       # table complete, still epoch 8
    assert not p.holding(True, gave_up.append, epoch=10)  # the new placement is in force
    assert p.since is None and p.stale_epoch is None and not gave_up
    q = ExpertPause(0.05)
    assert q.pause_stale(3, "stale")
    time.sleep(0.06)
    assert not q.holding(True, gave_up.append, epoch=3)  # never caught up: fail, do not hang
    assert gave_up and not q.pause_stale(3, "stale again")
    assert not q.holding(True, gave_up.append, epoch=3) and q.pause_stale(3, "a new one")
