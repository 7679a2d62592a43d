"""pyverbs plumbing for the rdma transport: device discovery and one RC queue pair.

Everything that touches verbs lives here, behind the small :class:`QueuePair` interface that
:mod:`libm2n.rdma` drives (``event_fd``, ``local_info``, ``connect``, ``post_recv``,
``write_imm``, ``take_event``, ``notify``, ``poll``, ``close``). The transport never imports
pyverbs itself, so it can be exercised end to end with any object offering that interface.

Status: written against the rdma-core pyverbs API (Debian ``python3-pyverbs``) but **never run
on a device** (the development machine has none); device discovery and the clear "no RDMA device"
error are tested.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import mmap
import os
import sys
from dataclasses import dataclass
from types import ModuleType

from libm2n.errors import TransportUnavailable

SYSTEM_PYVERBS = "/usr/lib/python3/dist-packages/pyverbs"
DEVICE_ENV = "M2N_RDMA_DEVICE"  # which verbs device to use (default: the first one)


@dataclass(frozen=True, slots=True)
class Completion:
    """One work completion, normalised: ``recv`` is True for an incoming WRITE_WITH_IMM."""

    recv: bool
    ok: bool
    imm: int = 0
    error: str = ""


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


def pick_device() -> str:
    """``$M2N_RDMA_DEVICE`` if set (it must exist), else the first device."""
    names = list_devices()
    wanted = os.environ.get(DEVICE_ENV)
    if wanted:
        if wanted not in names:
            raise TransportUnavailable(
                f"rdma: device {wanted!r} from ${DEVICE_ENV} not found (have: {', '.join(names)})")
        return wanted
    return names[0]


def open_context(device: str):  # noqa: ANN201 - pyverbs.device.Context
    """Open ``device``; TransportUnavailable naming the devices that exist if it is not one."""
    names = list_devices()
    if device not in names:
        raise TransportUnavailable(f"rdma: device {device!r} not found (have: {', '.join(names)})")
    from pyverbs.device import Context

    return Context(name=device)


def _fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


class QueuePair:
    """One RC QP whose MR covers ``mem`` (slot memory or staging), with an event channel.

    ``event_fd`` (the completion channel's fd) becomes readable when a completion arrives after
    :meth:`notify`; pyverbs does not expose it, so it is found as the fd the channel opened.
    """

    def __init__(self, device: str, mem: mmap.mmap, depth: int, port: int = 1,
                 gid_index: int = 0) -> None:
        import pyverbs.enums as e
        from pyverbs.cq import CQ, CompChannel
        from pyverbs.mr import MR
        from pyverbs.pd import PD
        from pyverbs.qp import QP, QPCap, QPInitAttr

        self.e = e
        self.ctx = open_context(device)
        self.port, self.gid_index = port, gid_index
        self.pd = PD(self.ctx)
        before = _fds()
        self.channel = CompChannel(self.ctx)
        new = sorted(_fds() - before)
        if len(new) != 1:
            self.close()
            raise TransportUnavailable("rdma: cannot find the completion channel's fd")
        self.event_fd = new[0]
        os.set_blocking(self.event_fd, False)
        self.cq = CQ(self.ctx, 4 * depth + 4, None, self.channel, 0)
        self._anchor = ctypes.c_char.from_buffer(mem)  # pins mem while the MR exists
        self.addr = ctypes.addressof(self._anchor)
        self.size = len(mem)
        access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        self.mr = MR(self.pd, self.size, access, address=self.addr)
        cap = QPCap(max_send_wr=2 * depth + 2, max_recv_wr=2 * depth + 2, max_send_sge=1,
                    max_recv_sge=1)
        self.qp = QP(self.pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq,
                                         cap=cap))
        self.psn = int.from_bytes(os.urandom(3), "little")
        self.remote: dict | None = None

    def local_info(self) -> dict:
        gid = self.ctx.query_gid(self.port, self.gid_index)
        lid = self.ctx.query_port(self.port).lid
        return {"qpn": self.qp.qp_num, "psn": self.psn, "gid": str(gid), "lid": lid,
                "rkey": self.mr.rkey, "addr": self.addr, "size": self.size}

    def connect(self, remote: dict) -> None:
        """Move the QP to RTS towards ``remote`` (the peer's decoded :meth:`local_info`)."""
        from pyverbs.addr import GID, AHAttr, GlobalRoute
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
        gr = GlobalRoute(dgid=GID(remote["gid"]), sgid_index=self.gid_index)
        attr.ah_attr = AHAttr(gr=gr, is_global=1, port_num=self.port, dlid=remote["lid"])
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        self.qp.to_rts(attr)
        self.remote = remote

    def post_recv(self, n: int = 1) -> None:
        """Post ``n`` zero-SGE receives: each WRITE_WITH_IMM that lands consumes one."""
        from pyverbs.wr import RecvWR

        for _ in range(n):
            self.qp.post_recv(RecvWR(num_sge=0))

    def write_imm(self, offset: int, length: int, remote_offset: int, imm: int) -> None:
        """RDMA WRITE ``mem[offset:offset+length]`` to the peer's MR at ``remote_offset``."""
        from pyverbs.wr import SGE, SendWR

        e, remote = self.e, self.remote
        wr = SendWR(opcode=e.IBV_WR_RDMA_WRITE_WITH_IMM, num_sge=1,
                    sg=[SGE(self.addr + offset, length, self.mr.lkey)],
                    send_flags=e.IBV_SEND_SIGNALED, imm_data=imm)
        wr.set_wr_rdma(remote["rkey"], remote["addr"] + remote_offset)
        try:
            self.qp.post_send(wr)
        except Exception as exc:  # PyverbsRDMAError: the QP is in error (peer gone)
            raise OSError(f"rdma: post_send failed: {exc}") from None

    def notify(self) -> None:
        """Ask for an event on ``event_fd`` at the next completion."""
        self.cq.req_notify()

    def take_event(self) -> None:
        """Consume the pending channel event (only when ``event_fd`` is readable)."""
        self.channel.get_cq_event(self.cq)
        self.cq.ack_events(1)

    def poll(self, n: int = 32) -> list[Completion]:
        npolled, wcs = self.cq.poll(n)
        out = []
        for wc in wcs[:max(npolled, 0)]:
            ok = wc.status == self.e.IBV_WC_SUCCESS
            recv = wc.opcode == self.e.IBV_WC_RECV_RDMA_WITH_IMM
            out.append(Completion(recv=recv, ok=ok, imm=wc.imm_data if recv else 0,
                                  error="" if ok else f"work completion status {wc.status}"))
        return out

    def close(self) -> None:
        for name in ("qp", "mr", "cq", "channel", "pd", "ctx"):
            obj = getattr(self, name, None)
            if obj is not None:
                try:
                    obj.close()
                except Exception:  # noqa: BLE001 - best-effort teardown
                    pass
        self._anchor = None
