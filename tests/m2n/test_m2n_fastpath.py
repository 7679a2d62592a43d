"""libm2n's C hot path is in use here, and the pure-Python fallback still carries traffic.

``LIBM2N_PURE_PYTHON=1`` forces the fallback (read once by :mod:`libm2n.fastpath`); the C and
Python implementations are compared function by function in ``test_m2n_fastpath_agree.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from m2n_peer import listen_url, pattern

import libm2n
from libm2n import fastpath
from libm2n import header as hdr


@pytest.mark.skipif(os.environ.get("LIBM2N_PURE_PYTHON", "") not in ("", "0"),
                    reason="LIBM2N_PURE_PYTHON forces the fallback in this run")
def test_fast_path_is_active():
    # This machine has gcc and the test command installs with it: the C path must be in use.
    assert fastpath.ACTIVE, fastpath.REASON
    from libm2n import _fast

    assert fastpath.check is _fast.check and fastpath.shm_send is _fast.shm_send
    assert fastpath.new_header(hdr.fields_of(hdr.Header(kind=1))) == hdr.Header(kind=1)



PURE_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, libm2n
    from libm2n import fastpath
    assert not fastpath.ACTIVE and "LIBM2N_PURE_PYTHON" in fastpath.REASON
    url = sys.argv[1]
    rx = libm2n.open_receiver(url, libm2n.ReceiverConfig(slots_per_sender=2, slot_bytes=1 << 20))
    tx = libm2n.connect(rx.url, libm2n.SenderConfig(sender_id=5))
    rng = np.random.default_rng(0)
    for i, (dtype, shape) in enumerate([("float32", (3, 5)), ("uint8", (1 << 20,)),
                                        ("int64", (2, 2, 2)), ("float16", (7,))] * 3):
        arr = rng.integers(0, 100, shape).astype(dtype)
        tx.send(arr, step=i, layer=2, micro_batch=1, tag=100 + i)
        with rx.recv(timeout=10) as msg:
            h = msg.header
            assert (h.sender_id, h.step, h.layer, h.micro_batch, h.tag) == (5, i, 2, 1, 100 + i)
            assert np.array_equal(msg.numpy().reshape(shape), arr)
    tx.close(); rx.close()
    print("PURE-OK")
""")


@pytest.mark.parametrize("url", ["shm://fastpath-pure-{pid}", "tcp://127.0.0.1:0"])
def test_pure_python_fallback_round_trip(url):
    env = dict(os.environ, LIBM2N_PURE_PYTHON="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PURE_SCRIPT, url.format(pid=os.getpid())],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "PURE-OK" in out.stdout, out.stderr[-2000:]


def test_c_sender_talks_to_a_pure_python_peer(peers, transport, shm_name, monkeypatch):
    """This process runs the C path, the echo peer the Python one: the wire is the same."""
    monkeypatch.setenv("LIBM2N_PURE_PYTHON", "1")  # inherited by the peer process only
    rx = libm2n.open_receiver(listen_url(transport, shm_name + "-back"),
                              libm2n.ReceiverConfig(slot_bytes=1 << 20))
    try:
        echo = peers(["echo", listen_url(transport, shm_name), rx.url, "3"])
        with libm2n.connect(echo.url, libm2n.SenderConfig(sender_id=9)) as tx:
            for tag, size in enumerate([1, 2048, 100_000, 1 << 20]):
                tx.send(pattern(9, tag, size), tag=tag, step=tag + 1).result(timeout=10)
                with rx.recv(timeout=20) as msg:
                    assert msg.sender_id == 3 and msg.header.tag == tag
                    assert bytes(msg.payload) == pattern(9, tag, size).tobytes()
    finally:
        rx.close()
