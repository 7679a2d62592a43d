"""The transport registry: every endpoint scheme, where its classes live, how it is addressed.

Data only: this module imports nothing, so the interface (:mod:`libm2n.base`, which parses and
prints endpoint URLs with it) sits below every transport while the factory
(:func:`libm2n.open_receiver` / :func:`libm2n.connect`) imports a transport's module by name the
first time its scheme is used. Adding a transport is one entry here plus its module; the
interface does not change.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["SCHEMES", "TRANSPORTS", "Transport"]


class Transport(NamedTuple):
    """Where a scheme's Receiver and Sender classes live (imported by the factory on first use)."""

    module: str
    receiver: str
    sender: str
    # True: ``SCHEME://NAME`` (a same-host name, Endpoint.port is 0); False: ``SCHEME://HOST:PORT``
    named: bool = False


TRANSPORTS: dict[str, Transport] = {
    "shm": Transport("libm2n.shm", "ShmReceiver", "ShmSender", named=True),
    "tcp": Transport("libm2n.tcp", "TcpReceiver", "TcpSender"),
    # HOST:PORT is the tcp side channel
    "rdma": Transport("libm2n.rdma", "RdmaReceiver", "RdmaSender"),
}
SCHEMES: tuple[str, ...] = tuple(TRANSPORTS)
