"""Receiving ends for the injector's tests: real sockets on loopback, drained by a thread so no
kernel buffer overflows and every delivered datagram is counted."""

from __future__ import annotations

import socket
import threading
from collections import Counter
from collections.abc import Iterator

import pytest


class UdpReceiver:
    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.count = 0
        self.sources: Counter[str] = Counter()
        self.sizes: Counter[int] = Counter()
        self.payloads: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        buf = bytearray(65536)
        while not self._stop.is_set():
            try:
                n, (host, _port) = self.sock.recvfrom_into(buf)
            except TimeoutError:
                continue
            except OSError:
                return
            self.count += 1
            self.sources[host] += 1
            self.sizes[n] += 1
            if len(self.payloads) < 4:
                self.payloads.add(bytes(buf[:n]))

    def settle(self, quiet: float = 0.2, limit: float = 5.0) -> int:
        """Wait until nothing has arrived for `quiet` seconds; return the count."""
        import time

        deadline = time.monotonic() + limit
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            if self.count != last:
                last, since = self.count, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
            time.sleep(0.02)
        return self.count

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


class TcpSink:
    """A listening TCP socket that accepts every connection and reads everything."""

    def __init__(self, port: int = 0) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(128)
        self.listener.settimeout(0.05)
        self.port: int = self.listener.getsockname()[1]
        self.bytes = 0
        self.peers: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, (host, _port) = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.peers.append(host)
            t = threading.Thread(target=self._read, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _read(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(1 << 16)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                with self._lock:
                    self.bytes += len(data)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        self.listener.close()


@pytest.fixture
def udp_receiver() -> Iterator[UdpReceiver]:
    r = UdpReceiver()
    yield r
    r.close()


@pytest.fixture
def udp_receivers() -> Iterator[list[UdpReceiver]]:
    rs = [UdpReceiver() for _ in range(3)]
    yield rs
    for r in rs:
        r.close()


@pytest.fixture
def tcp_sink() -> Iterator[TcpSink]:
    s = TcpSink()
    yield s
    s.close()


def free_port_pair() -> tuple[socket.socket, socket.socket]:
    """A UDP socket and a TCP listener on the same port number (for `mixed`)."""
    for _ in range(20):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            t.bind(("127.0.0.1", u.getsockname()[1]))
        except OSError:
            u.close()
            t.close()
            continue
        return u, t
    raise RuntimeError("no port free for both UDP and TCP")


@pytest.fixture
def mixed_sinks() -> Iterator[tuple[UdpReceiver, TcpSink]]:
    u, t = free_port_pair()
    port = u.getsockname()[1]
    u.close()
    t.close()
    r, s = UdpReceiver(port), TcpSink(port)
    yield r, s
    r.close()
    s.close()
