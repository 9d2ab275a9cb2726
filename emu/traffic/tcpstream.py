"""tcp-stream: many real TCP connections streaming to listening ports, over ordinary sockets.

Each message is one write of `size` bytes, counted when its last byte is accepted by the kernel.
Sockets are non-blocking: a receiver that stops reading stalls only its own connection, and the
run still ends on time (the engine waits for writability in short slices).
"""

from __future__ import annotations

import select
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from emu.traffic.profiles import payload
from emu.traffic.spec import InjectStats
from emu.traffic.target import Target

CONNECT_TIMEOUT = 2.0


@dataclass
class _Conn:
    sock: socket.socket
    target: Target
    off: int = 0  # bytes of the current message already accepted


class TcpStreams:
    def __init__(self, targets: Sequence[Target], connections: int, size: int, sources: Sequence[str] | None = None) -> None:
        self.data = memoryview(payload(size))
        self.size = size
        self.conns: list[_Conn] = []
        self.refused: list[str] = []
        self.i = 0
        for k in range(connections):
            t = targets[k % len(targets)]
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                if sources:
                    # Every address in 127/8 is local: a real (not spoofed) source per connection.
                    s.bind((sources[k % len(sources)], 0))
                s.settimeout(CONNECT_TIMEOUT)
                s.connect(t.addr)
                s.setblocking(False)
            except OSError as exc:
                s.close()
                self.refused.append(f"{t}: {exc.strerror or exc}")
                continue
            self.conns.append(_Conn(s, t))

    def send(self, n: int, stats: InjectStats) -> int:
        """Make up to `n` writes round-robin over the connections; returns how many completed."""
        conns = self.conns
        done = stalled = 0
        while done < n and conns and stalled < len(conns):
            self.i %= len(conns)
            c = conns[self.i]
            self.i += 1
            try:
                k = c.sock.send(self.data[c.off :])
            except BlockingIOError:
                stalled += 1
                continue
            except OSError as exc:  # reset or closed by the peer: drop this connection
                stats.error(exc)
                c.sock.close()
                conns.remove(c)
                continue
            stats.bytes += k
            c.off += k
            if c.off == self.size:
                c.off = 0
                done += 1
                stalled = 0
            else:
                stalled += 1  # partial write: its send buffer is full
        stats.sent += done
        return done

    def wait(self, timeout: float) -> None:
        """Block until some connection can take more data, or `timeout`."""
        if self.conns and timeout > 0:
            poller = select.poll()  # not select(): descriptors may exceed FD_SETSIZE
            for c in self.conns:
                poller.register(c.sock, select.POLLOUT)
            poller.poll(timeout * 1000)

    def close(self) -> None:
        for c in self.conns:
            c.sock.close()
        self.conns.clear()
