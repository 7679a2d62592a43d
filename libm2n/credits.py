"""Slot and credit accounting shared by every transport.

Receiver side, :class:`SlotTable` tracks which of one sender's slots hold an unreleased message
(a DATA frame into a busy slot, or a DATA frame out of sequence, is a protocol error).
Sender side, :class:`CreditPool` holds the free slots (credits) and the FIFO of sends waiting for
one, each with its deadline. Neither does I/O; the transports call them under their own locks.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

from libm2n.errors import ProtocolError


class SlotTable:
    """Busy flags and the expected next sequence number of one sender's slots."""

    __slots__ = ("busy", "next_seq", "in_use")

    def __init__(self, nslots: int) -> None:
        self.busy = [False] * nslots
        self.next_seq = 0
        self.in_use = 0

    def occupy(self, slot: int, seq: int) -> None:
        """Mark ``slot`` busy for DATA frame ``seq``; ProtocolError if that breaks the contract."""
        if seq != self.next_seq:
            raise ProtocolError(f"out-of-order frame: seq {seq}, expected {self.next_seq}")
        if self.busy[slot]:
            raise ProtocolError(f"slot {slot} written while still in use (no credit held)")
        self.busy[slot] = True
        self.next_seq += 1
        self.in_use += 1

    def free(self, slot: int) -> bool:
        """Mark ``slot`` free; returns False if it already was."""
        if not self.busy[slot]:
            return False
        self.busy[slot] = False
        self.in_use -= 1
        return True


@dataclass(slots=True)
class PendingSend:
    """A send waiting for a credit: what to write, and the completion to finish."""

    meta: tuple  # header fields, see StreamSender._write
    data: object  # a C-contiguous buffer (fastpath.payload), kept alive until written
    future: Future
    deadline: float


class CreditPool:
    """Free slots granted by the receiver plus the FIFO of sends waiting for one."""

    __slots__ = ("nslots", "free", "pending", "seq")

    def __init__(self, nslots: int) -> None:
        self.nslots = nslots
        self.free: deque[int] = deque(range(nslots))
        self.pending: deque[PendingSend] = deque()
        self.seq = 0

    def take(self) -> tuple[int, int] | None:
        """Return ``(slot, seq)`` if a credit is free and nothing is queued ahead, else None."""
        if self.pending or not self.free:
            return None
        return self._next()

    def _next(self) -> tuple[int, int]:
        slot = self.free.popleft()
        seq = self.seq
        self.seq += 1
        return slot, seq

    def grant(self, slot: int) -> None:
        """A CREDIT frame returned ``slot``; ProtocolError if it is not ours to get back."""
        if slot >= self.nslots:
            raise ProtocolError(f"credit for slot {slot} out of range ({self.nslots} slots)")
        if slot in self.free:
            raise ProtocolError(f"duplicate credit for slot {slot}")
        self.free.append(slot)

    def ready(self) -> list[tuple[PendingSend, int, int]]:
        """Pop queued sends that now have a credit, with their ``(slot, seq)``, in FIFO order."""
        out = []
        while self.pending and self.free:
            p = self.pending.popleft()
            slot, seq = self._next()
            out.append((p, slot, seq))
        return out

    def expired(self, now: float | None = None) -> bool:
        """True if the oldest queued send has waited past its deadline."""
        now = time.monotonic() if now is None else now
        return bool(self.pending) and self.pending[0].deadline <= now

    def outstanding(self) -> int:
        """Slots currently holding a message the receiver has not released."""
        return self.nslots - len(self.free)
