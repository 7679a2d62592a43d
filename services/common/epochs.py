"""The bound on a pushed placement epoch.

Placement epochs only move forward, and only by the scheduler's hand: the scheduler numbers
each placement one above the last (services/scheduler/state.py), and a node ignores an epoch
older than the one in force. A pushed epoch (``UpdatePlacement``, callable by the scheduler
role only: services/common/rights.py) must also stay within :data:`MAX_EPOCH_STEP` of the
node's epoch in force, and below :data:`MAX_EPOCH`: one forged ``epoch = 2**62`` must not pin
a node above every real placement to come. A node that is new (epoch 0) takes its first epoch
from the scheduler it registered with (the registration's GetPlacement), which is not bounded
by a step; a push to it is bounded by :data:`MAX_EPOCH` only.
"""

from __future__ import annotations

MAX_EPOCH_STEP = 1000
MAX_EPOCH = 1 << 53  # far beyond one increment per placement for any deployment's life


def check_pushed_epoch(current: int, proposed: int) -> None:
    """Raise ValueError (the caller answers INVALID_ARGUMENT) for a pushed epoch the node must
    refuse: above :data:`MAX_EPOCH`, or more than :data:`MAX_EPOCH_STEP` above ``current``
    when the node has an epoch in force."""
    if proposed > MAX_EPOCH:
        raise ValueError(f"placement epoch {proposed} is above the limit {MAX_EPOCH}")
    if current > 0 and proposed > current + MAX_EPOCH_STEP:
        raise ValueError(f"placement epoch {proposed} jumps more than {MAX_EPOCH_STEP} above "
                         f"the epoch in force ({current})")
