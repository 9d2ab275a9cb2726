"""The unprivileged fallback: udp-flood without spoofing over one ordinary UDP socket.

No raw socket, so no CAP_NET_RAW: the source is the socket's own (127.0.0.1, ephemeral port).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from emu.traffic.profiles import IP_HLEN, UDP_HLEN, payload
from emu.traffic.spec import InjectStats
from emu.traffic.target import Target


class UdpSocketSender:
    def __init__(self, targets: Sequence[Target], size: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
        data = payload(size)
        self._flat = [(data, t.addr) for t in targets]
        self._wire = size + IP_HLEN + UDP_HLEN
        self.i = 0

    @property
    def source(self) -> tuple[str, int]:
        return self.sock.getsockname()

    def send(self, n: int, stats: InjectStats) -> int:
        flat, size, i = self._flat, len(self._flat), self.i
        sendto = self.sock.sendto
        ok = 0
        for _ in range(n):
            data, addr = flat[i]
            i += 1
            if i == size:
                i = 0
            try:
                sendto(data, addr)
                ok += 1
            except OSError as exc:
                stats.error(exc)
        self.i = i
        stats.sent += ok
        stats.packets += ok
        stats.bytes += ok * self._wire
        return n

    def wait(self, timeout: float) -> None:
        return None

    def close(self) -> None:
        self.sock.close()
