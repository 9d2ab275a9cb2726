"""Emulated sockets: `struct sock` for UDP and TCP, each backed by one real socket on loopback.

`queue_rcv_skb` is the end of the receive path for every frame (steps 6 to 8, Linux's
`sock_queue_rcv_skb` with 3.6's `sk_filter` pfmemalloc check): a reserve skb for a socket that is
not SOCK_MEMALLOC is dropped; past the receive buffer an skb is dropped, except a reserve skb for a
memalloc socket (the "stream deadlock" fix); otherwise it is queued and its truesize stays charged
to `sk_rmem_alloc` until a reader takes it.

`sk_set_memalloc` marks a socket that serves the VM (v12's SOCK_VMIO, 3.6's SOCK_MEMALLOC): its
allocations get `__GFP_EMERGENCY` (v12) / `__GFP_MEMALLOC` (3.6), and under v12 the first such
socket hangs the network part of the reserve tree under the root.

An owner (an emulated process) is recorded for the ss view; `app_reader` reads a socket only
while its owner's pages are resident.
"""

from __future__ import annotations

import socket as _socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from emu.mm.gfp import GFP_KERNEL, GFP_NOIO, Gfp
from emu.kernel.policy import Policy
from emu.net.netstat import PFMEMALLOC, QUEUED, RCVBUFF
from emu.net.skb_queue import SkbQueue
from emu.net.skbuff import SKB_OVERHEAD, SkBuff, SkbRun

if TYPE_CHECKING:
    from emu.net.stack import NetStack
    from emu.net.wire import Wire

RMEM_DEFAULT = 212992  # net.core.rmem_default
SOCK_MIN_RCVBUF = 2 * (2048 + 232 + 320)  # room for at least two full-size skbs


class Sock:
    """One emulated socket."""

    def __init__(self, net: NetStack, proto: str, raw: _socket.socket, owner: Any = None,
                 rcvbuf: int = RMEM_DEFAULT) -> None:
        if proto not in ("udp", "tcp"):
            raise ValueError(f"protocol must be udp or tcp, not {proto!r}")
        self.net = net
        self.skbs = net.skbs
        self.proto = proto
        self.raw = raw
        self.tsock = trio.socket.from_stdlib_socket(raw)  # the same socket, for awaiting sends
        self.owner = owner
        self.sk_rcvbuf = max(int(rcvbuf), SOCK_MIN_RCVBUF)
        self.sk_rmem_alloc = 0
        self.sk_drops = 0  # drops after demux (the kernel's sk_drops)
        # Every drop of a frame for this socket, by reason, before demux included (diagnostics:
        # the emulator's wire knows whose frame it was even when the kernel would not).
        self.rx_drops: dict[str, int] = {}
        self.receive_queue = SkbQueue()
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
        self.wire: Wire | None = None
        self.ready = False  # something was queued in the current poll (sk_data_ready pending)
        self.sk_obj: Any = None  # the struct sock's slab object
        self.bytes_read = 0
        self.dgrams_read = 0  # skbs read by the owner (read_all)

    # ---- SOCK_MEMALLOC -------------------------------------------------------------------------

    def sk_set_memalloc(self) -> None:
        """Mark the socket as serving the VM (idempotent)."""
        if self.memalloc:
            return
        self.net.memalloc_socket_added()  # first: may refuse (a v12 reserve that cannot fit)
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
        self.net.memalloc_socket_removed()

    # ---- steps 6-8 (the receive path, synchronously) -------------------------------------------

    def queue_rcv_skb(self, skb: SkBuff) -> int:
        """sock_queue_rcv_skb(): returns QUEUED, or the drop verdict (the skb is then freed)."""
        if skb.memalloc and not self.memalloc:  # step 6: sk_filter's pfmemalloc check
            self.sk_drops += 1
            self.skbs.free(skb)
            return PFMEMALLOC
        truesize = skb.truesize
        if self.sk_rmem_alloc + truesize >= self.sk_rcvbuf:  # step 7 (2.6.22: rmem + truesize >= rcvbuf)
            if not (skb.memalloc and self.memalloc):
                self.sk_drops += 1
                self.skbs.free(skb)
                return RCVBUFF
            self.net.stat.rcvbuf_bypass += 1
        self.receive_queue.append(skb)  # step 8
        self.sk_rmem_alloc += truesize
        self.rx_queued_bytes += skb.len
        return QUEUED

    def count_drops(self, reason: str, n: int = 1, *, after_demux: bool = False) -> None:
        """`n` frames for this socket dropped for `reason` by the receive path (`after_demux`:
        by steps 6-7, which the kernel counts in sk_drops too)."""
        self.rx_drops[reason] = self.rx_drops.get(reason, 0) + n
        if after_demux:
            self.sk_drops += n

    def rcv_room(self, truesize: int) -> int:
        """How many ordinary skbs of `truesize` step 7 would still queue, one after the other."""
        free = self.sk_rcvbuf - self.sk_rmem_alloc - truesize
        return 0 if free <= 0 else (free - 1) // truesize + 1

    def queue_rcv_run(self, run: SkbRun) -> None:
        """Step 8 for a run of ordinary skbs that `rcv_room` said fit (like frames taken
        together): the same as `queue_rcv_skb` for each."""
        self.receive_queue.append_run(run)
        n = len(run)
        self.sk_rmem_alloc += n * (run.size + SKB_OVERHEAD)
        self.rx_queued_bytes += n * run.payload

    def data_ready(self) -> None:
        """sk_data_ready: wake the readers (once per poll, not per skb)."""
        self._readers.unpark_all()

    def rx_eof(self) -> None:
        self.eof = True
        self.state = "CLOSE-WAIT"
        self._readers.unpark_all()

    def rx_error(self, exc: OSError) -> None:
        self.error = exc
        self.state = "CLOSE"
        self._readers.unpark_all()

    def tcp_window(self) -> int:
        """Payload bytes the emulated receive buffer can still take (the advertised window)."""
        per = self.net.tcp_chunk_truesize
        free = self.sk_rcvbuf - self.sk_rmem_alloc - 1
        return max(0, free // per) * self.net.mss

    def rx_emergency_skbs(self) -> int:
        return self.receive_queue.memalloc_skbs()

    # ---- readers --------------------------------------------------------------------------------

    async def wait_readable(self) -> None:
        while not self.receive_queue and not self.eof and self.error is None:
            if self.closed:
                raise trio.ClosedResourceError("socket closed")
            await self._readers.park()

    def _dequeue(self) -> SkBuff:
        skb = self.receive_queue.popleft()
        self.sk_rmem_alloc -= skb.truesize
        self.rx_queued_bytes -= skb.len - self.head_off
        self.head_off = 0
        if self.wire is not None:
            self.wire.rcv_space()
        return skb

    async def recv_skb(self) -> SkBuff:
        """skb_recv_datagram: the next skb, still charged to memory; the caller frees it."""
        await self.wait_readable()
        if not self.receive_queue:
            self._raise_if_error()
            raise trio.EndOfChannel("end of stream")
        return self._dequeue()

    def _copied(self, n: int) -> None:
        """copy_to_user of n bytes: the CPU pays for the copy."""
        self.bytes_read += n
        net = self.net
        net.stat.app_read_bytes += n
        net.cpu.charge(n * net.costs.copy_byte)

    async def recvfrom(self) -> tuple[bytes, tuple[str, int]]:
        """One datagram and its source: copies the payload out and frees the skb."""
        skb = await self.recv_skb()
        data = bytes(skb.data)
        addr = (skb.saddr, skb.sport)
        self.skbs.free(skb)
        self._copied(len(data))
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
            skb = q.peek()
            off = self.head_off
            take = min(skb.len - off, max_bytes - n)
            out.append(skb.data[off:off + take])
            n += take
            if off + take >= skb.len:
                self.skbs.free(self._dequeue())
            else:
                self.head_off = off + take
                self.rx_queued_bytes -= take
        self._copied(n)
        return b"".join(out)

    def read_all(self) -> int:
        """An application reads everything queued (copy to user, free); returns the bytes."""
        q = self.receive_queue
        if not q:
            return 0
        n = self.rx_queued_bytes
        self.dgrams_read += len(q)
        truesize = self.skbs.free_queue(q.take_all())
        self.sk_rmem_alloc -= truesize
        self.rx_queued_bytes = 0
        self.head_off = 0
        if self.wire is not None:
            self.wire.rcv_space()
        self._copied(n)
        return n

    def _raise_if_error(self) -> None:
        if self.error is not None:
            raise self.error
        if self.closed:
            raise trio.ClosedResourceError("socket closed")

    # ---- transmit -------------------------------------------------------------------------------

    async def sendmsg(self, data: bytes | bytearray | memoryview, addr: tuple[str, int] | None = None) -> None:
        """Send one datagram (UDP) or stream bytes (TCP), paying for TX skbs in emulated memory
        and for the transmit path in CPU time.  TX skbs are allocated with `sk_allocation` (may
        sleep in reclaim) and freed once the real socket took the bytes; a TCP send goes out
        16 segments (one sk_sndbuf's worth) at a time."""
        if self.closed:
            raise trio.ClosedResourceError("socket closed")
        net = self.net
        if self.proto == "udp":
            await self._xmit(data, addr, net.tx_frame_sizes("udp", len(data)))
            return
        view = memoryview(data)
        step = 16 * net.mss
        for start in range(0, len(view), step):
            part = view[start:start + step]
            await self._xmit(part, None, net.tx_frame_sizes("tcp", len(part)))

    async def _xmit(self, data: bytes | bytearray | memoryview, addr: tuple[str, int] | None,
                    sizes: list[int]) -> None:
        net = self.net
        try:
            skbs = await self.skbs.tx(sizes, self.sk_allocation)
        except BaseException:
            net.stat.tx_nomem += 1
            raise
        try:
            net.cpu.charge(len(sizes) * net.costs.tx_frame)
            if self.closed:
                raise trio.ClosedResourceError("socket closed")
            await net.xmit(self, data, addr)
        finally:
            reserve = 0
            for s in skbs:
                reserve += s.memalloc != 0
                self.skbs.free(s)
        stat = net.stat
        stat.tx_skbs += len(sizes)
        stat.tx_skbs_reserve += reserve
        stat.tx_bytes += len(data)

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
            self.skbs.free(self._dequeue())
        self._readers.unpark_all()

    def wire_state(self) -> str:
        w = self.wire
        return "" if w is None else w.state()

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
    then read and free everything queued, at most every `interval` seconds.  Runs until the
    socket closes or is cancelled."""
    while not sock.closed:
        try:
            await sock.wait_readable()
        except trio.ClosedResourceError:
            return
        if sock.eof and not sock.receive_queue:
            return
        if resident is not None:
            await resident()
        sock.read_all()
        if interval:
            await trio.sleep(interval)
        elif sock.receive_queue or sock.eof or sock.error is not None or sock.closed:
            await trio.lowlevel.checkpoint()
        # else the queue is empty and wait_readable parks: that is the schedule point
