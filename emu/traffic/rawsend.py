"""Sending prebuilt IP packets on one `socket(AF_INET, SOCK_RAW, IPPROTO_RAW)`.

IPPROTO_RAW implies IP_HDRINCL: our bytes go out as they are, except that the kernel fills in the
IP header checksum and total length (raw(7)). Sending on it needs CAP_NET_RAW.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

from emu.traffic.profiles import Datagram
from emu.traffic.spec import InjectStats

CAP_NET_RAW = 13  # linux/capability.h


class NeedsRawError(PermissionError):
    """Crafting IP headers needs root or CAP_NET_RAW; the message says how to run instead."""

    def __init__(self, profile: str, why: str = "") -> None:
        what = {"udp-flood": "spoofs source addresses", "frag": "crafts IP fragments", "mixed": "spoofs sources and crafts IP fragments"}.get(profile, "crafts IP headers")
        super().__init__(
            f"the {profile} profile {what}, which needs a raw socket: root or CAP_NET_RAW{(' (' + why + ')') if why else ''}.\n"
            f"Run it as root (sudo {_netswap()} inject ...), or without privileges use\n"
            "  --profile udp-flood --no-spoof   (ordinary UDP sockets, source 127.0.0.1)"
        )
        self.profile = profile


def _netswap() -> str:
    import shutil

    return shutil.which("netswap") or "netswap"


def have_cap_net_raw() -> bool:
    """Whether this process may open raw sockets: CAP_NET_RAW in its effective set (root has it).

    Read from /proc, so asking opens no socket."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_RAW & 1)
    except OSError:
        pass
    import os

    return os.geteuid() == 0


def open_raw_socket(profile: str) -> socket.socket:
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except PermissionError as exc:
        raise NeedsRawError(profile, exc.strerror or "permission denied") from None
    # A flood must not stall on a full send buffer for long; a big buffer absorbs bursts.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    return sock


class RawSender:
    """Cycles a pool of prebuilt datagrams on a raw socket; one call sends up to `n` of them."""

    def __init__(self, sock: socket.socket, pool: Sequence[Datagram]) -> None:
        if not pool:
            raise ValueError("empty packet pool")
        self.sock = sock
        self.single = all(len(d.packets) == 1 for d in pool)
        if self.single:
            self._flat: list[tuple[bytes, tuple[str, int]]] = [(d.packets[0], d.dst) for d in pool]
        self._pool = [(d.packets, d.dst, d.nbytes) for d in pool]
        self.i = 0

    @property
    def pool_size(self) -> int:
        return len(self._pool)

    def send(self, n: int, stats: InjectStats) -> int:
        """Send the next `n` datagrams of the pool; returns `n` (failures are counted in stats)."""
        return self._send_single(n, stats) if self.single else self._send_multi(n, stats)

    def _send_single(self, n: int, stats: InjectStats) -> int:
        flat, size, i = self._flat, len(self._flat), self.i
        sendto = self.sock.sendto
        ok = nbytes = 0
        for _ in range(n):
            pkt, dst = flat[i]
            i += 1
            if i == size:
                i = 0
            try:
                nbytes += sendto(pkt, dst)
                ok += 1
            except OSError as exc:  # ENOBUFS under load, EPERM from a firewall: count, carry on
                stats.error(exc)
        self.i = i
        stats.sent += ok
        stats.packets += ok
        stats.bytes += nbytes
        return n

    def _send_multi(self, n: int, stats: InjectStats) -> int:
        pool, size, i = self._pool, len(self._pool), self.i
        sendto = self.sock.sendto
        ok = packets = nbytes = 0
        for _ in range(n):
            pkts, dst, total = pool[i]
            i += 1
            if i == size:
                i = 0
            done = 0
            try:
                for p in pkts:
                    sendto(p, dst)
                    done += 1
            except OSError as exc:
                stats.error(exc)
                packets += done
                continue
            packets += done
            nbytes += total
            ok += 1
        self.i = i
        stats.sent += ok
        stats.packets += packets
        stats.bytes += nbytes
        return n

    def wait(self, timeout: float) -> None:  # a raw send never waits for a peer
        return None

    def close(self) -> None:
        self.sock.close()
