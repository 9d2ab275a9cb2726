"""Wires: draining the real sockets behind the emulated host into frames.

Every emulated socket is backed by one real socket on loopback; its wire is the trio task that
reads it for the NIC.  A wire waits until its socket is readable, then drains it with non-blocking
reads in batches (DESIGN §11: ~6x a plain `await recvfrom()` loop), and hands each piece to the
receive stage in arrival order, in softirq context:

- UDP: each datagram is one IP datagram; longer than the MTU it becomes the fragments the sender's
  IP layer would have made (`ip_fragments`), each its own frame.
- TCP: bytes are cut into MSS-sized chunks, one frame each.  The real kernel has already ACKed
  them, so a dropped chunk is *held*: re-offered after a retransmission timeout (200 ms, doubling,
  capped), and nothing more is read from that connection meanwhile.  The wire also honours the
  emulated receive window: it reads no more than the socket's free receive buffer can hold, so a
  slow reader closes the real TCP window exactly as it would close the emulated one.
"""

from __future__ import annotations

import functools
import socket as _socket
from typing import TYPE_CHECKING

import trio

from emu.mm.sched import current, softirq

if TYPE_CHECKING:
    from emu.net.rx import Nic
    from emu.net.sock import Sock

IP_HDR = 20
UDP_HDR = 8
TCP_HDR = 32  # with the timestamp option, as Linux sends it on loopback
MTU_DEFAULT = 1500
MSS_DEFAULT = MTU_DEFAULT - IP_HDR - TCP_HDR  # 1448

TCP_RTO_MIN = 0.2
TCP_RTO_MAX = 120.0

BATCH = 64  # frames per wakeup before yielding to other wires
# The real kernel's buffer behind each emulated UDP socket: big, so loopback never drops first.
REAL_RCVBUF_DEFAULT = 8 << 20


@functools.lru_cache(maxsize=4096)  # floods repeat a few sizes; the result is immutable
def ip_fragments(ip_payload: int, mtu: int = MTU_DEFAULT) -> tuple[tuple[int, int, bool], ...]:
    """How ip_fragment cuts an IP payload of `ip_payload` bytes: [(offset, length, more_fragments)].

    One piece if it fits (`ip_payload + 20 <= mtu`); otherwise pieces of `(mtu - 20) & ~7` bytes
    (offsets are in units of 8), the last one shorter.  For a UDP datagram of L payload bytes and
    MTU 1500 that is ceil((L + 8) / 1480) fragments (DESIGN §6).
    """
    if ip_payload < 0:
        raise ValueError("negative payload")
    if ip_payload + IP_HDR <= mtu:
        return ((0, ip_payload, False),)
    per = (mtu - IP_HDR) & ~7
    if per <= 0:
        raise ValueError(f"MTU {mtu} too small to fragment")
    out = []
    off = 0
    while off < ip_payload:
        n = min(per, ip_payload - off)
        out.append((off, n, off + n < ip_payload))
        off += n
    return tuple(out)


def udp_frames(payload: int, mtu: int = MTU_DEFAULT) -> int:
    """Frames (fragments) a UDP datagram of `payload` bytes arrives as."""
    return len(ip_fragments(payload + UDP_HDR, mtu))


def tcp_chunks(nbytes: int, mss: int = MSS_DEFAULT) -> int:
    return -(-nbytes // mss)


def set_big_rcvbuf(sock: _socket.socket, nbytes: int) -> None:
    """Let the real kernel absorb bursts so the emulated host, not loopback, decides what to drop."""
    try:
        sock.setsockopt(_socket.SOL_SOCKET, 33, nbytes)  # SO_RCVBUFFORCE (root)
    except OSError:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, nbytes)


class UdpWire:
    """Drains one real UDP socket; every datagram goes to `nic.udp_input`."""

    def __init__(self, nic: Nic, sock: Sock | None, raw: _socket.socket) -> None:
        self.nic = nic
        self.sock = sock  # None: a port the host receives on but has no socket for
        self.raw = raw
        self.laddr, self.lport = raw.getsockname()[:2]
        self.buf = bytearray(65536)
        self.cancel_scope = trio.CancelScope()

    async def run(self) -> None:
        raw = self.raw
        udp_poll = self.nic.udp_poll
        wait_readable = trio.lowlevel.wait_readable
        current_time = trio.current_time
        task = current()  # ksoftirqd/0: the Nic starts its wires in that context
        with self.cancel_scope:
            while True:
                await wait_readable(raw)
                # softirq(), spelled out: this runs once per wakeup, often for a few frames only
                task.in_softirq = True
                try:
                    if not udp_poll(self, current_time()):
                        return  # the socket was closed under us: it is going away
                finally:
                    task.in_softirq = False


class TcpWire:
    """Drains one real TCP connection in MSS chunks, holding a refused chunk for re-offer."""

    def __init__(self, nic: Nic, sock: Sock, raw: _socket.socket) -> None:
        self.nic = nic
        self.sock = sock
        self.raw = raw
        self.pending = b""
        self.pos = 0
        self.rto = nic.tcp_rto_min
        self.held_since: float | None = None
        self.cancel_scope = trio.CancelScope()

    async def run(self) -> None:
        raw = self.raw
        sock = self.sock
        nic = self.nic
        stat = nic.stat
        mss = nic.mss
        tcp_input = nic.tcp_input
        with self.cancel_scope:
            while True:
                if self.pos >= len(self.pending):
                    want = sock.tcp_window()
                    if want < min(mss, sock.tcp_window_max()):
                        stat.tcp_window_closed += 1
                        while sock.tcp_window() < min(mss, sock.tcp_window_max()):
                            await sock.wait_space()
                        continue
                    await trio.lowlevel.wait_readable(raw)
                    try:
                        data = raw.recv(min(want, 65536))
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        if raw.fileno() == -1:  # closed under us: the socket is going away
                            return
                        stat.wire_errors += 1
                        sock.rx_error(exc)
                        return
                    if not data:
                        stat.wire_eof += 1
                        sock.rx_eof()
                        return
                    self.pending = data
                    self.pos = 0
                pending = self.pending
                with softirq():
                    now = trio.current_time()
                    nic.new_poll()
                    pos = self.pos
                    end = len(pending)
                    while pos < end:
                        chunk = pending[pos:pos + mss]
                        if not tcp_input(sock, chunk, now):
                            break
                        pos += len(chunk)
                    self.pos = pos
                if self.pos < len(pending):
                    # Dropped: the peer "retransmits" after RTO; read nothing else meanwhile.
                    stat.tcp_held += 1
                    if self.held_since is None:
                        self.held_since = trio.current_time()
                    await trio.sleep(self.rto)
                    self.rto = min(self.rto * 2, nic.tcp_rto_max)
                    stat.tcp_reoffer += 1
                else:
                    self.rto = nic.tcp_rto_min
                    self.held_since = None

    def state(self, now: float) -> str:
        """For ss: how long a chunk has been held on this wire, and the current RTO."""
        if self.held_since is None:
            return ""
        return f"held {now - self.held_since:.1f}s rto {self.rto:g}s"

