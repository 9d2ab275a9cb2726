"""Emulated sockets: `struct sock` for UDP and TCP, each backed by one real socket on loopback.

The receive stage queues skbs on `receive_queue` (charging `sk_rmem_alloc` with their truesize,
against `sk_rcvbuf`); readers take them off and free them, which uncharges.  `sk_set_memalloc`
marks a socket that serves the VM (v12's SOCK_VMIO, 3.6's SOCK_MEMALLOC): its allocations get
`__GFP_MEMALLOC` (3.6) / `__GFP_EMERGENCY` (v12), reserve skbs addressed to it are accepted, and
under v12 the first such socket hangs the network part of the reserve tree under the root.

An owner (an emulated process) is recorded for the ss view; application reader tasks
(`app_reader`) read a socket only while their owner's pages are resident.
"""

from __future__ import annotations

import collections
import socket as _socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from emu.mm.gfp import GFP_KERNEL, GFP_NOIO, Gfp, Policy
from emu.net.wire import IP_HDR, TCP_HDR, UDP_HDR, ip_fragments

if TYPE_CHECKING:
    from emu.net.skbuff import SkBuff
    from emu.net.stack import NetStack

RMEM_DEFAULT = 212992  # net.core.rmem_default
SOCK_MIN_RCVBUF = 2 * (2048 + 232 + 320)  # room for at least two full-size skbs


class Sock:
    """One emulated socket."""

    def __init__(self, net: NetStack, proto: str, raw: _socket.socket, owner: Any = None,
                 rcvbuf: int = RMEM_DEFAULT) -> None:
        if proto not in ("udp", "tcp"):
            raise ValueError(f"protocol must be udp or tcp, not {proto!r}")
        self.net = net
        self.proto = proto
        self.raw = raw
        self.tsock = trio.socket.from_stdlib_socket(raw)  # the same socket, for awaiting sends
        self.owner = owner
        self.sk_rcvbuf = max(int(rcvbuf), SOCK_MIN_RCVBUF)
        self.sk_rmem_alloc = 0
        self.sk_wmem_alloc = 0
        self.sk_drops = 0  # drops after demux (the kernel's sk_drops)
        # Every drop of a frame for this socket, by reason, before demux included (diagnostics:
        # the emulator's wire knows whose frame it was even when the kernel would not).
        self.rx_drops: dict[str, int] = {}
        self.receive_queue: collections.deque[SkBuff] = collections.deque()
        self.rx_queued_bytes = 0
        self.head_off = 0  # bytes of receive_queue[0] already read (TCP)
        self.memalloc = False  # SOCK_MEMALLOC / SOCK_VMIO
        self.sk_allocation: Gfp = GFP_KERNEL
        self.state = "UNCONN" if proto == "udp" else "ESTAB"
        self.eof = False
        self.error: OSError | None = None
        self.closed = False
        self.laddr, self.lport = raw.getsockname()[:2]
        try:
            self.raddr, self.rport = raw.getpeername()[:2]
            self.state = "ESTAB"  # as ss shows a connected UDP socket too
        except OSError:
            self.raddr, self.rport = "*", 0
        self._readers = trio.lowlevel.ParkingLot()
        self._space = trio.lowlevel.ParkingLot()
        # Plain flags (cheaper than asking the ParkingLot on every skb): someone is parked.
        self._readers_waiting = False
        self._space_waiting = False
        self.wire: Any = None
        self.sk_obj: Any = None  # the struct sock's slab object
        self.bytes_read = 0

    # ---- SOCK_MEMALLOC -------------------------------------------------------------------------

    def sk_set_memalloc(self) -> None:
        """Mark the socket as serving the VM (idempotent)."""
        if self.memalloc:
            return
        self.net.memalloc_socket_added(self)  # first: may refuse (a v12 reserve that cannot fit)
        self.memalloc = True
        pol = self.net.policy
        if pol is Policy.PFMEMALLOC:
            self.sk_allocation = GFP_NOIO | Gfp.MEMALLOC
        elif pol is Policy.V12:
            self.sk_allocation = GFP_NOIO | Gfp.EMERGENCY
        else:
            self.sk_allocation = GFP_NOIO  # a vanilla kernel has no reserve to give

    def sk_clear_memalloc(self) -> None:
        if not self.memalloc:
            return
        self.memalloc = False
        self.sk_allocation = GFP_KERNEL
        self.net.memalloc_socket_removed(self)

    # ---- receive side (called by the receive stage, synchronously) -----------------------------

    def queue_rcv_skb(self, skb: SkBuff) -> None:
        """Step 8: queue; the memory stays charged until the owner reads it."""
        self.receive_queue.append(skb)
        self.sk_rmem_alloc += skb.truesize
        self.rx_queued_bytes += skb.len
        skb.sk = self
        if self._readers_waiting:
            self._readers_waiting = False
            self._readers.unpark_all()

    def rx_eof(self) -> None:
        self.eof = True
        self.state = "CLOSE-WAIT"
        self._readers.unpark_all()

    def rx_error(self, exc: OSError) -> None:
        self.error = exc
        self.state = "CLOSE"
        self._readers.unpark_all()

    def drop(self, reason: str, pre_demux: bool = False) -> None:
        if not pre_demux:
            self.sk_drops += 1
        d = self.rx_drops
        d[reason] = d.get(reason, 0) + 1

    def tcp_window(self) -> int:
        """Payload bytes the emulated receive buffer can still take (the advertised window)."""
        per = self.net.tcp_chunk_truesize
        free = self.sk_rcvbuf - self.sk_rmem_alloc - 1
        return max(0, free // per) * self.net.mss

    def tcp_window_max(self) -> int:
        return max(1, (self.sk_rcvbuf - 1) // self.net.tcp_chunk_truesize) * self.net.mss

    async def wait_space(self) -> None:
        """Sleep until a reader frees receive-buffer space (the window update)."""
        self._space_waiting = True
        await self._space.park()

    def rx_emergency_skbs(self) -> int:
        return sum(1 for s in self.receive_queue if s.memalloc)

    # ---- receive side (readers) -----------------------------------------------------------------

    async def wait_readable(self) -> None:
        while not self.receive_queue and not self.eof and self.error is None:
            if self.closed:
                raise trio.ClosedResourceError("socket closed")
            self._readers_waiting = True
            await self._readers.park()

    def _dequeue(self) -> SkBuff:
        skb = self.receive_queue.popleft()
        self.sk_rmem_alloc -= skb.truesize
        self.rx_queued_bytes -= skb.len - self.head_off
        self.head_off = 0
        if self._space_waiting:
            self._space_waiting = False
            self._space.unpark_all()
        return skb

    async def recv_skb(self) -> SkBuff:
        """skb_recv_datagram: the next skb, still charged to memory; the caller frees it."""
        await self.wait_readable()
        if not self.receive_queue:
            self._raise_if_error()
            raise trio.EndOfChannel("end of stream")
        return self._dequeue()

    async def recvfrom(self) -> tuple[bytes, tuple[str, int]]:
        """One datagram and its source: copies the payload out and frees the skb."""
        skb = await self.recv_skb()
        data = bytes(skb.data)
        addr = (skb.saddr, skb.sport)
        skb.free()
        self.bytes_read += len(data)
        self.net.stat.app_read_bytes += len(data)
        return data, addr

    async def recv(self, max_bytes: int = 65536) -> bytes:
        """tcp_recvmsg: up to max_bytes of the stream, freeing skbs as they are consumed.

        Returns b"" at end of stream.
        """
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        await self.wait_readable()
        if not self.receive_queue:
            self._raise_if_error()
            return b""
        out = []
        n = 0
        q = self.receive_queue
        while q and n < max_bytes:
            skb = q[0]
            off = self.head_off
            take = min(skb.len - off, max_bytes - n)
            out.append(skb.data[off:off + take])
            n += take
            if off + take >= skb.len:
                self._dequeue().free()
            else:
                self.head_off = off + take
                self.rx_queued_bytes -= take
        self.bytes_read += n
        self.net.stat.app_read_bytes += n
        return b"".join(out)

    def read_all_nowait(self) -> int:
        """Consume everything queued (an application reading its socket); returns bytes read."""
        q = self.receive_queue
        if not q:
            return 0
        n = self.rx_queued_bytes
        truesize = self.net.mem.skb_free_queue(q)
        self.sk_rmem_alloc -= truesize
        self.rx_queued_bytes = 0
        self.head_off = 0
        if self._space_waiting:
            self._space_waiting = False
            self._space.unpark_all()
        self.bytes_read += n
        self.net.stat.app_read_bytes += n
        return n

    def _raise_if_error(self) -> None:
        if self.error is not None:
            raise self.error
        if self.closed:
            raise trio.ClosedResourceError("socket closed")

    # ---- transmit -------------------------------------------------------------------------------

    async def sendmsg(self, data: bytes | bytearray | memoryview, addr: tuple[str, int] | None = None) -> None:
        """Send one datagram (UDP) or stream bytes (TCP), paying for TX skbs in emulated memory.

        TX skbs are allocated with `sk_allocation` (may sleep in reclaim), and freed once the real
        socket took the bytes.
        """
        if self.closed:
            raise trio.ClosedResourceError("socket closed")
        net = self.net
        if self.proto == "udp":
            sizes = [n + IP_HDR for _, n, _ in ip_fragments(len(data) + UDP_HDR, net.mtu)]
            skbs = await net.mem.tx_skbs(sizes, self)
            try:
                if addr is None:
                    await self.tsock.send(data)
                else:
                    await self.tsock.sendto(data, addr)
            finally:
                for s in skbs:
                    s.free()
            net.stat.tx_bytes += len(data)
            return
        view = memoryview(data)
        mss = net.mss
        step = 16 * mss  # one sk_sndbuf-sized burst at a time
        for start in range(0, len(view), step):
            part = view[start:start + step]
            sizes = [min(mss, len(part) - o) + IP_HDR + TCP_HDR for o in range(0, len(part), mss)]
            skbs = await net.mem.tx_skbs(sizes, self)
            try:
                while part:
                    sent = await self.tsock.send(part)
                    part = part[sent:]
            finally:
                for s in skbs:
                    s.free()
        net.stat.tx_bytes += len(view)

    # ---- teardown / views -----------------------------------------------------------------------

    def close(self) -> None:
        """Unhash, stop the wire, free queued skbs, close the real socket."""
        if self.closed:
            return
        self.closed = True
        self.state = "CLOSE"
        self.sk_clear_memalloc()
        self.net.unhash(self)
        while self.receive_queue:
            self._dequeue().free()
        self._readers.unpark_all()
        self._space.unpark_all()

    def wire_state(self) -> str:
        st = getattr(self.wire, "state", None)
        if st is None:
            return ""
        try:
            return st(trio.current_time())
        except RuntimeError:  # outside trio.run (a report printed afterwards)
            return ""

    def local_str(self) -> str:
        return f"{self.laddr}:{self.lport}"

    def peer_str(self) -> str:
        return f"{self.raddr}:{self.rport}" if self.rport else "*:*"

    def owner_name(self) -> str:
        o = self.owner
        if o is None:
            return "kernel"
        return str(getattr(o, "name", None) or getattr(o, "comm", None) or o)

    def __repr__(self) -> str:
        flag = " SOCK_MEMALLOC" if self.memalloc else ""
        return (f"<Sock {self.proto} {self.local_str()} -> {self.peer_str()} q={len(self.receive_queue)} "
                f"rmem={self.sk_rmem_alloc}/{self.sk_rcvbuf}{flag}>")


async def app_reader(sock: Sock, resident: Callable[[], Awaitable[None]] | None = None,
                     interval: float = 0.0) -> None:
    """An application's receive loop: whenever data is queued, make sure the process is resident
    (`resident()` faults its working set in; blocks while it is swapped out and memory is short),
    then read and free everything queued.  Runs until the socket closes or is cancelled."""
    while not sock.closed:
        try:
            await sock.wait_readable()
        except trio.ClosedResourceError:
            return
        if sock.eof and not sock.receive_queue:
            return
        if resident is not None:
            await resident()
        sock.read_all_nowait()
        if interval:
            await trio.sleep(interval)
        elif sock.receive_queue or sock.eof or sock.error is not None or sock.closed:
            await trio.lowlevel.checkpoint()
        # else the queue is empty and wait_readable parks: that is the schedule point
