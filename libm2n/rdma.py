"""RDMA transport (pyverbs): RC queue pairs, WRITE_WITH_IMM into registered slot memory.

Status: device detection is tested here; the data path below is written against the pyverbs API
but has **never run** (this machine has no RDMA device). Everything it shares with shm/tcp (the
header, slot/credit accounting, the control frames) is tested through those transports.

Design:

* ``rdma://DEVICE:PORT``: DEVICE is the verbs device (``mlx5_0``), PORT a TCP port used out of
  band. The control connection is exactly the tcp transport's (HELLO/WELCOME, CREDIT, ERROR,
  CLOSE frames), extended after the WELCOME by one JSON line each way carrying
  ``qpn, psn, gid, lid, port, rkey, addr`` (receiver: its slot MR; sender: its staging MR).
* Slot ``i`` of a sender lives at ``addr + i * (128 + slot_bytes)``: the 128-byte header, then
  the payload. The sender writes header + payload into its staging MR, posts one
  ``RDMA_WRITE_WITH_IMM`` with ``imm = slot << 20 | (seq & 0xFFFFF)`` into that slot; the receiver
  polls its CQ, reads the header from the slot (zero copy), validates it like any other frame and
  hands out a view of the payload. Releasing returns a CREDIT frame on the control connection.
* GPUDirect: a CUDA tensor can be registered directly (``MR`` on device memory via dmabuf) when
  the NIC and driver support it; not implemented here, CUDA tensors are staged to host memory.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from types import ModuleType

from libm2n.api import Endpoint, ReceiverConfig, SenderConfig
from libm2n.errors import TransportUnavailable

SYSTEM_PYVERBS = "/usr/lib/python3/dist-packages/pyverbs"
IMM_SLOT_SHIFT = 20
SLOT_HEADER = 128


def load_pyverbs() -> ModuleType:
    """Import pyverbs, falling back to Debian's system copy (same CPython ABI)."""
    try:
        return importlib.import_module("pyverbs")
    except ImportError:
        pass
    init = os.path.join(SYSTEM_PYVERBS, "__init__.py")
    if not os.path.exists(init):
        raise TransportUnavailable("rdma: pyverbs is not installed (python3-pyverbs)")
    spec = importlib.util.spec_from_file_location("pyverbs", init,
                                                  submodule_search_locations=[SYSTEM_PYVERBS])
    if spec is None or spec.loader is None:
        raise TransportUnavailable(f"rdma: cannot load pyverbs from {SYSTEM_PYVERBS}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pyverbs"] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as exc:
        sys.modules.pop("pyverbs", None)
        raise TransportUnavailable(f"rdma: cannot import pyverbs ({exc})") from None
    return mod


def list_devices() -> list[str]:
    """Names of the RDMA devices; TransportUnavailable if there are none."""
    load_pyverbs()
    try:
        from pyverbs.device import get_device_list

        devices = get_device_list()
    except Exception as exc:  # PyverbsRDMAError when the kernel has no verbs devices
        raise TransportUnavailable(f"rdma: no RDMA device found ({exc})") from None
    names = [d.name.decode() if isinstance(d.name, bytes) else str(d.name) for d in devices]
    if not names:
        raise TransportUnavailable("rdma: no RDMA device found (the device list is empty)")
    return names


def open_context(device: str):  # noqa: ANN201 - pyverbs.device.Context
    """Open ``device``; TransportUnavailable naming the devices that exist if it is not one."""
    names = list_devices()
    if device not in names:
        raise TransportUnavailable(f"rdma: device {device!r} not found (have: {', '.join(names)})")
    from pyverbs.device import Context

    return Context(name=device)


class _Verbs:
    """One RC QP with its PD, CQ and one registered buffer (untested without a device)."""

    def __init__(self, device: str, size: int, depth: int, port: int = 1, gid_index: int = 0):
        import pyverbs.enums as e
        from pyverbs.cq import CQ
        from pyverbs.mr import MR
        from pyverbs.pd import PD
        from pyverbs.qp import QP, QPCap, QPInitAttr

        self.e = e
        self.ctx = open_context(device)
        self.port, self.gid_index = port, gid_index
        self.pd = PD(self.ctx)
        self.cq = CQ(self.ctx, 2 * depth)
        access = (e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE)
        self.mr = MR(self.pd, size, access)
        cap = QPCap(max_send_wr=depth, max_recv_wr=depth, max_send_sge=1, max_recv_sge=1)
        self.qp = QP(self.pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq,
                                         cap=cap))
        self.psn = int.from_bytes(os.urandom(3), "little")

    def local_info(self) -> dict:
        gid = self.ctx.query_gid(self.port, self.gid_index)
        lid = self.ctx.query_port(self.port).lid
        return {"qpn": self.qp.qp_num, "psn": self.psn, "gid": str(gid), "lid": lid,
                "rkey": self.mr.rkey, "addr": self.mr.buf}

    def connect(self, remote: dict) -> None:
        """Move the QP to RTS towards ``remote`` (the peer's :meth:`local_info`)."""
        from pyverbs.addr import AHAttr, GlobalRoute
        from pyverbs.qp import QPAttr

        e = self.e
        attr = QPAttr(qp_state=e.IBV_QPS_RTR, cur_qp_state=e.IBV_QPS_INIT)
        attr.path_mtu = e.IBV_MTU_1024
        attr.dest_qp_num = remote["qpn"]
        attr.rq_psn = remote["psn"]
        attr.sq_psn = self.psn
        attr.max_dest_rd_atomic = 1
        attr.max_rd_atomic = 1
        attr.min_rnr_timer = 12
        attr.timeout = 14
        attr.retry_cnt = 7
        attr.rnr_retry = 7
        gr = GlobalRoute(dgid=_gid(remote["gid"]), sgid_index=self.gid_index)
        attr.ah_attr = AHAttr(gr=gr, is_global=1, port_num=self.port, dlid=remote["lid"])
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        self.qp.to_rts(attr)

    def post_recv(self) -> None:
        from pyverbs.wr import RecvWR

        self.qp.post_recv(RecvWR(num_sge=0))

    def write_imm(self, offset: int, length: int, raddr: int, rkey: int, imm: int) -> None:
        from pyverbs.wr import SGE, SendWR

        e = self.e
        wr = SendWR(opcode=e.IBV_WR_RDMA_WRITE_WITH_IMM, num_sge=1,
                    sg=[SGE(self.mr.buf + offset, length, self.mr.lkey)],
                    send_flags=e.IBV_SEND_SIGNALED, imm_data=imm)
        wr.set_wr_rdma(rkey, raddr)
        self.qp.post_send(wr)

    def poll(self, n: int = 16) -> list:
        npolled, wcs = self.cq.poll(n)
        return wcs[:npolled] if npolled > 0 else []

    def close(self) -> None:
        for obj in (self.qp, self.mr, self.cq, self.pd, self.ctx):
            try:
                obj.close()
            except Exception:  # noqa: BLE001 - best-effort teardown
                pass


def _gid(text: str):  # noqa: ANN202
    from pyverbs.addr import GID

    return GID(text)


def exchange_info(sock, mine: dict) -> dict:  # noqa: ANN001 - a connected tcp socket
    """Swap one JSON line of connection info over the out-of-band tcp control socket."""
    sock.sendall(json.dumps(mine).encode() + b"\n")
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk or len(buf) > 65536:
            raise TransportUnavailable("rdma: peer closed during the QP info exchange")
        buf += chunk
    return json.loads(buf)


class RdmaReceiver:
    """``rdma://DEVICE:PORT`` receiver. Raises TransportUnavailable without an RDMA device."""

    def __init__(self, ep: Endpoint, config: ReceiverConfig) -> None:
        open_context(ep.host).close()  # fail fast and clearly when there is no device
        raise TransportUnavailable(
            "rdma: the receive path needs a device to be validated; see libm2n/rdma.py _Verbs")


class RdmaSender:
    """Sender to an ``rdma://DEVICE:PORT`` receiver. Raises TransportUnavailable without one."""

    def __init__(self, ep: Endpoint, config: SenderConfig) -> None:
        open_context(ep.host).close()
        raise TransportUnavailable(
            "rdma: the send path needs a device to be validated; see libm2n/rdma.py _Verbs")
