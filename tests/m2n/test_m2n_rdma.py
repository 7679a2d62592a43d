"""rdma transport: clear unavailability here; the data path needs a device (skipped)."""

from __future__ import annotations

import pytest

import libm2n
from libm2n import rdma


def _rdma_reason() -> str | None:
    try:
        rdma.list_devices()
    except libm2n.TransportUnavailable as exc:
        return str(exc)
    return None


REASON = _rdma_reason()


def test_pyverbs_loads_from_the_system_copy():
    try:
        mod = rdma.load_pyverbs()
    except libm2n.TransportUnavailable as exc:
        pytest.skip(str(exc))
    assert mod.__name__ == "pyverbs"


@pytest.mark.skipif(REASON is None, reason="this machine has an RDMA device")
def test_no_device_is_a_clear_error():
    assert REASON.startswith("rdma: ")
    for call in (lambda: libm2n.open_receiver("rdma://mlx5_0:7471"),
                 lambda: libm2n.connect("rdma://mlx5_0:7471", libm2n.SenderConfig(sender_id=1))):
        with pytest.raises(libm2n.TransportUnavailable, match=r"^rdma: "):
            call()


def test_rdma_round_trip():
    if REASON is not None:
        pytest.skip(REASON)
    pytest.skip("rdma data path is not validated yet (no device in CI); see libm2n/rdma.py")
