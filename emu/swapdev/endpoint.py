"""Where a swap device lives: an NFS export or an iSCSI LUN on a real server, by URL.

URLs are spelled the way libnfs and libiscsi spell them:

    nfs://127.0.0.1/export?nfsport=P&mountport=Q[&swapfile=NAME]
    iscsi://127.0.0.1:3261/iqn.2024-01.test:tgt/1

Only loopback addresses are accepted: netswap never sends anything off this machine.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_IQN = "iqn.2026-01.org.netswap:swap"
SWAPFILE = "netswap.swap"


class ServerURLError(ValueError):
    pass


@dataclass(frozen=True)
class NfsEndpoint:
    host: str
    export: str
    nfsport: int
    mountport: int
    swapfile: str = SWAPFILE

    def url(self) -> str:
        return f"nfs://{self.host}{self.export}?nfsport={self.nfsport}&mountport={self.mountport}"


@dataclass(frozen=True)
class IscsiEndpoint:
    host: str
    port: int
    iqn: str
    lun: int

    def url(self) -> str:
        return f"iscsi://{self.host}:{self.port}/{self.iqn}/{self.lun}"


Endpoint = NfsEndpoint | IscsiEndpoint


def nfs_transport(backend: str) -> Literal["udp", "tcp"]:
    """The transport of an NFS backend (nfs-udp, nfs-tcp)."""
    return "udp" if backend == "nfs-udp" else "tcp"


def _loopback(host: str, url: str) -> str:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ServerURLError(f"{url}: host {host!r} must be an IPv4 address in 127.0.0.0/8") from None
    if not addr.is_loopback or addr.version != 4:
        raise ServerURLError(f"{url}: host {host} is not in 127.0.0.0/8 (netswap stays on loopback)")
    return host


def _port(value: str, name: str, url: str) -> int:
    try:
        p = int(value)
    except ValueError:
        raise ServerURLError(f"{url}: {name}={value!r} is not a port number") from None
    if not 0 < p < 65536:
        raise ServerURLError(f"{url}: {name}={p} is not a port number (1-65535)")
    return p


def parse_server_url(url: str) -> Endpoint:
    """Parse an nfs:// or iscsi:// URL as libnfs / libiscsi do (explicit ports for NFS)."""
    parts = urlsplit(url)
    if parts.scheme == "nfs":
        if parts.port is not None:
            raise ServerURLError(f"{url}: libnfs does not take host:port; give ?nfsport=P&mountport=Q")
        host = _loopback(parts.hostname or "", url)
        export = unquote(parts.path) or ""
        if not export.startswith("/") or export == "/":
            raise ServerURLError(f"{url}: the path must name the export, e.g. nfs://127.0.0.1/export")
        q = parse_qs(parts.query, keep_blank_values=True)
        unknown = set(q) - {"nfsport", "mountport", "version", "swapfile"}
        if unknown:
            raise ServerURLError(f"{url}: unknown option(s) {', '.join(sorted(unknown))}")
        if q.get("version", ["3"])[0] != "3":
            raise ServerURLError(f"{url}: only NFS version=3 is supported")
        if "nfsport" not in q or "mountport" not in q:
            raise ServerURLError(f"{url}: give both ?nfsport=P&mountport=Q (netswap does not ask portmap)")
        swapfile = q.get("swapfile", [SWAPFILE])[0]
        if not swapfile or "/" in swapfile or swapfile in (".", ".."):
            raise ServerURLError(f"{url}: swapfile={swapfile!r} must be a plain file name")
        return NfsEndpoint(host, export.rstrip("/"), _port(q["nfsport"][0], "nfsport", url),
                         _port(q["mountport"][0], "mountport", url), swapfile)
    if parts.scheme == "iscsi":
        host = _loopback(parts.hostname or "", url)
        try:
            port = parts.port or 3260
        except ValueError:
            raise ServerURLError(f"{url}: bad port") from None
        bits = [b for b in parts.path.split("/") if b]
        if len(bits) != 2:
            raise ServerURLError(f"{url}: expected iscsi://127.0.0.1[:port]/<target-iqn>/<lun>")
        iqn, lun_s = bits
        if not (iqn.startswith("iqn.") or iqn.startswith("eui.") or iqn.startswith("naa.")):
            raise ServerURLError(f"{url}: {iqn!r} is not an iSCSI name (iqn., eui. or naa.)")
        try:
            lun = int(lun_s)
        except ValueError:
            raise ServerURLError(f"{url}: LUN {lun_s!r} is not a number") from None
        if not 0 <= lun < 16384:
            raise ServerURLError(f"{url}: LUN {lun} out of range")
        return IscsiEndpoint(host, port, iqn, lun)
    raise ServerURLError(f"{url}: expected an nfs:// or iscsi:// URL")


def backend_kind(backend: str) -> str:
    return "iscsi" if backend == "iscsi" else "nfs"


def server_for_backend(backend: str, url: str) -> Endpoint:
    """`url` parsed for `backend`: a scheme of the other kind is named first (before any detail
    of the URL that the right scheme would not even ask for)."""
    scheme = urlsplit(url).scheme
    want = backend_kind(backend)
    if scheme in ("nfs", "iscsi") and scheme != want:
        raise ServerURLError(f"backend {backend} needs an {want}:// server, got {url}")
    return parse_server_url(url)


def backend_for_url(url: str, backend: str) -> str:
    """The backend a server URL implies when none was asked for: iscsi:// is iSCSI, nfs:// keeps
    an NFS `backend`'s transport (NFS/UDP if `backend` was iSCSI); another scheme changes nothing
    (server_for_backend then says what is wrong)."""
    scheme = urlsplit(url).scheme  # (lower case: urlsplit folds it)
    if scheme == "iscsi":
        return "iscsi"
    if scheme == "nfs" and backend == "iscsi":
        return "nfs-udp"
    return backend
