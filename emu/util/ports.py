"""Free loopback ports: bind port 0 and let the kernel choose."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


class NoFreePortError(OSError):
    """No port was free on the address after 100 tries."""


def free_port(host: str = LOOPBACK, *, udp_too: bool = False, avoid: set[int] | frozenset[int] = frozenset()) -> int:
    """A port free for TCP (and for UDP too when asked) on `host` right now, not in `avoid`."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((host, 0))
            port = t.getsockname()[1]
            if port in avoid:
                continue
            if not udp_too:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host, port))
                except OSError:
                    continue
                return port
    raise NoFreePortError(f"no free port found on {host}")


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
