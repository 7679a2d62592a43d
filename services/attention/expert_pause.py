"""Requests wait, rather than fail, while experts they need have no live replica.

When an expert node dies and it held the only copy of some experts, a lane step routed to them
fails with :class:`~services.attention.routing.ExpertUnavailable`. The engine then re-queues
that step's requests (their KV freed: they resume by recompute, output kept) and starts no
step until the routing table serves every expert again: a new placement from the scheduler
(an elastic pool reassigns the lost experts to the survivors, which load them from the
checkpoint; a restarted node is attached again) or a node re-admitted. After ``wait_s``
without one, the waiting requests fail with the error, and later steps that hit the gap fail
at once (no copy and no reload: fail fast) until the table is complete again.

A node that refuses a dispatch as routed by a stale placement epoch (the replica has not
adopted the newer placement yet: it is on its way, pushed or polled) pauses the same way, until
the replica's epoch passes the refused one.

The engine calls both methods under its lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("megascale.attention.engine")


class ExpertPause:
    """Serving -> paused (since a step failed for lost experts) -> serving again, or gave up."""

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self.since: float | None = None   # time.monotonic() the pause began
        self.gave_up = False              # waited wait_s in vain: fail at once until complete
        self.why = ""
        self.stale_epoch: int | None = None  # paused until the placement is past this epoch
        self.pauses = 0                   # pauses so far
        self.last_pause_s = 0.0           # how long the last pause that ended lasted

    def pause(self, complete: bool, why: str) -> bool:
        """A step failed for lost experts: True when its requests should wait (re-queued),
        False when they should fail now (the table is complete, so the failure was a refusal;
        or waiting is off or already given up)."""
        if complete or self.gave_up or self.wait_s <= 0:
            return False
        if self.since is None:
            self.since = time.monotonic()
            self.pauses += 1
        self.why = why
        return True

    def pause_stale(self, epoch: int, why: str) -> bool:
        """A step was refused as routed by placement ``epoch``: True when its requests should
        wait (re-queued) for a newer placement, False when they should fail now."""
        if self.gave_up or self.wait_s <= 0:
            return False
        if self.since is None:
            self.since = time.monotonic()
            self.pauses += 1
        self.stale_epoch = epoch if self.stale_epoch is None else max(self.stale_epoch, epoch)
        self.why = why
        return True

    def holding(self, complete: bool, give_up: Callable[[str], None], epoch: int = 0) -> bool:
        """Whether steps must not start now. ``complete``: the routing table serves every
        expert; ``epoch``: the placement in force. ``give_up(message)`` fails the waiting
        requests once ``wait_s`` passed."""
        if self.stale_epoch is not None and epoch > self.stale_epoch:
            self.stale_epoch = None
        if complete and self.stale_epoch is None:
            if self.since is not None:
                self.last_pause_s = time.monotonic() - self.since
                log.warning("every expert is served again: paused requests resume (paused "
                            "%.2f s)", self.last_pause_s)
            self.since, self.gave_up = None, False
            return False
        if self.since is None:
            return False
        if time.monotonic() - self.since < self.wait_s:
            return True
        self.since, self.gave_up, self.stale_epoch = None, True, None
        give_up(f"{self.why} (no placement served them within --expert-wait "
                f"{self.wait_s:g} s)")
        return False
