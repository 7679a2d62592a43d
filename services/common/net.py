"""Addresses a node advertises to its peers (which may differ from the address it binds)."""

from __future__ import annotations

import socket

import libm2n


def advertise_host(bind_host: str, advertise: str | None) -> str:
    """The host peers should dial: ``advertise`` if given; for a wildcard bind (0.0.0.0 / ::)
    this machine's primary address; else the bind host itself."""
    if advertise:
        return advertise
    if bind_host in ("0.0.0.0", "::", ""):
        return socket.gethostbyname(socket.gethostname())
    return bind_host


def advertised_url(url: str, host: str) -> str:
    """A libm2n URL with its host replaced by ``host`` (shm URLs have no host: unchanged)."""
    ep = libm2n.parse_url(url)
    if ep.scheme == "shm":
        return url
    return libm2n.Endpoint(ep.scheme, host, ep.port).url
