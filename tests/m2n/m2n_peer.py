"""A real libm2n peer process for the tests (run as a script, never imported by libm2n).

Roles (argv[1]); every role prints one ``READY <url>`` line once listening, then JSON results:

* ``echo LISTEN_URL REPLY_URL ID``: receive, send the same payload back (same tag), release.
* ``sink LISTEN_URL EXPECTED [SLOTS SLOT_BYTES]``: receive EXPECTED messages, check each payload
  equals ``pattern(sender, tag, size)`` and that tags from one sender arrive in order; print a JSON
  summary.
* ``hold LISTEN_URL``: receive and never release (a hung receiver), until killed.
* ``source ID COUNT SIZE URL...``: send COUNT pattern messages to each URL (tags 0..COUNT-1),
  round-robin over receivers; print a JSON summary.
* ``stream ID URL``: send small messages forever (until killed or the receiver goes).
* ``ping ID LISTEN_URL TARGET_URL SIZES``: send one pattern message per size to an echo peer at
  TARGET_URL, check the echo, print JSON.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

import libm2n


def pattern(sender: int, tag: int, size: int) -> np.ndarray:
    return np.random.default_rng([sender, tag, size]).integers(0, 256, size, dtype=np.uint8)


def listen_url(transport: str, name: str) -> str:
    """A fresh listening URL for ``transport`` (tcp picks a free port)."""
    return f"shm://{name}" if transport == "shm" else "tcp://127.0.0.1:0"


def ready(url: str) -> None:
    print(f"READY {url}", flush=True)


def main(argv: list[str]) -> int:
    role = argv[1]
    if role == "echo":
        rx = libm2n.open_receiver(argv[2], libm2n.ReceiverConfig(slot_bytes=8 << 20))
        ready(rx.url)
        tx = libm2n.connect(argv[3], libm2n.SenderConfig(sender_id=int(argv[4]),
                                                         connect_timeout_s=10))
        while True:
            try:
                msg = rx.recv(timeout=30)
            except TimeoutError:
                return 0
            with msg:
                tx.send(msg.payload, tag=msg.header.tag).result(timeout=10)
    if role == "sink":
        expected = int(argv[3])
        slots = int(argv[4]) if len(argv) > 4 else 4
        slot_bytes = int(argv[5]) if len(argv) > 5 else 1 << 20
        rx = libm2n.open_receiver(argv[2], libm2n.ReceiverConfig(slots_per_sender=slots,
                                                                 slot_bytes=slot_bytes))
        ready(rx.url)
        last: dict[int, int] = {}
        bad = out_of_order = 0
        for _ in range(expected):
            with rx.recv(timeout=60) as msg:
                s, tag = msg.sender_id, msg.header.tag
                if tag != last.get(s, -1) + 1:
                    out_of_order += 1
                last[s] = tag
                if not np.array_equal(np.frombuffer(msg.payload, np.uint8),
                                      pattern(s, tag, len(msg.payload))):
                    bad += 1
        print(json.dumps({"received": expected, "bad": bad, "out_of_order": out_of_order,
                          "per_sender": {str(k): v + 1 for k, v in last.items()}}), flush=True)
        time.sleep(0.2)
        rx.close()
        return 0
    if role == "hold":
        rx = libm2n.open_receiver(argv[2], libm2n.ReceiverConfig(slots_per_sender=2,
                                                                 slot_bytes=1 << 16))
        ready(rx.url)
        held = []
        for _ in range(100000):
            try:
                held.append(rx.recv(timeout=1))
            except TimeoutError:
                pass
        return 0
    if role == "source":
        sid, count, size, urls = int(argv[2]), int(argv[3]), int(argv[4]), argv[5:]
        txs = [libm2n.connect(u, libm2n.SenderConfig(sender_id=sid)) for u in urls]
        ready("source")
        futs = []
        for tag in range(count):
            data = pattern(sid, tag, size)
            for tx in txs:
                futs.append(tx.send(data, tag=tag))
        for f in futs:
            f.result(timeout=60)
        print(json.dumps({"sent": len(futs), "queued": sum(t.stats()["queued"] for t in txs)}),
              flush=True)
        for tx in txs:
            tx.close()
        return 0
    if role == "stream":
        tx = libm2n.connect(argv[3], libm2n.SenderConfig(sender_id=int(argv[2])))
        ready("stream")
        for tag in range(10**7):
            tx.send(pattern(int(argv[2]), tag, 64), tag=tag).result(timeout=30)
            time.sleep(0.002)
        return 0
    if role == "ping":
        sid, listen, target = int(argv[2]), argv[3], argv[4]
        sizes = [int(x) for x in argv[5].split(",")]
        rx = libm2n.open_receiver(listen, libm2n.ReceiverConfig(slot_bytes=8 << 20))
        tx = libm2n.connect(target, libm2n.SenderConfig(sender_id=sid, connect_timeout_s=20))
        ready(rx.url)
        ok = 0
        for i, size in enumerate(sizes):
            data = pattern(sid, i, size)
            tx.send(data, tag=i).result(timeout=20)
            with rx.recv(timeout=20) as msg:
                ok += int(msg.header.tag == i and np.array_equal(
                    np.frombuffer(msg.payload, np.uint8), data))
        print(json.dumps({"ok": ok, "total": len(sizes)}), flush=True)
        tx.close()
        rx.close()
        return 0
    raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
