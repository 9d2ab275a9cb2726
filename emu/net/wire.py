"""Wires: the real sockets behind the emulated host, read into the NIC's RX ring.

Every emulated socket is backed by one real socket on loopback: its *wire*.  Reading and
processing are separate, as a NIC's DMA and its driver's poll are:

- `Wire.pull()` reads whatever the real socket holds, without processing it, into the wire's
  ring, each piece stamped with the emulated time it is *due* at this host's NIC: a datagram the
  traffic generator sent at t is due at t plus the wire latency; a reply from a real peer is due a
  round trip after its request left (`link.PeerLink`); anything unexpected is due when it is read.
  A wire's watcher task pulls when the real socket becomes readable; the clock
  (emu.kernel.clock) pulls before it lets time pass an input it awaits; the traffic generator
  pulls right after sending.
- The NIC (emu.net.nic) processes the rings at its interrupt times, handing every frame to the
  receive path (`RxPath`).

UDP: one datagram is one IP datagram; longer than the MTU it arrives as the fragments the sender's
IP layer would have made (RxPath.udp).  TCP: the stream is cut into MSS-sized segments (never
across a reply boundary); a dropped segment is *held*: offered again after a retransmission
timeout (200 ms, doubling, capped), and nothing after it meanwhile, as the peer would retransmit
it.  A TCP wire reads no more than the emulated receive window allows, so a slow reader closes the
real TCP window as it would close the emulated one.
"""

from __future__ import annotations

import bisect
import collections
import errno
import math
import socket as _socket
from typing import TYPE_CHECKING, Any

import trio

from emu.net.netstat import QUEUED

if TYPE_CHECKING:
    from emu.kernel.clock import Awaited
    from emu.net.link import Framer, PeerLink, Tag
    from emu.net.nic import Nic
    from emu.net.sock import Sock

READ_MAX = 256  # datagrams read per pull at most
READ_CAP = 4 << 20  # bytes a TCP wire reads ahead of the NIC at most (tcp_rmem's maximum, 2.6.2x)
# The real kernel's buffer behind each emulated UDP socket: big, so loopback never drops first.
REAL_RCVBUF_DEFAULT = 8 << 20
GRACE_PEER = 10.0  # wall seconds a real peer may take to answer before the clock stops waiting
GRACE_TRAFFIC = 1.0  # wall seconds a datagram may take on loopback before it counts as lost


def _due_key(frame: tuple[Any, ...]) -> float:
    return frame[0]  # type: ignore[no-any-return]


def set_big_rcvbuf(sock: _socket.socket, nbytes: int) -> None:
    """Let the real kernel absorb bursts so the emulated host, not loopback, decides what to drop."""
    try:
        sock.setsockopt(_socket.SOL_SOCKET, 33, nbytes)  # SO_RCVBUFFORCE (root)
    except OSError:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, nbytes)


class Wire:
    """What UDP and TCP wires share: the real socket, the clock, what is awaited from it."""

    grace = GRACE_PEER

    def __init__(self, nic: Nic, sock: Sock | None, raw: _socket.socket, *, link: PeerLink | None = None,
                 framer: Framer | None = None, grace: float | None = None) -> None:
        self.nic = nic
        self.sock = sock
        self.raw = raw
        self.fd = raw.fileno()
        self.link = link
        self.framer = framer
        self.clock = nic.clock
        if grace is not None:
            self.grace = grace
        self.cancel_scope = trio.CancelScope()  # the watcher's
        self.scheduled = math.inf  # when the NIC will next service this wire
        self.index = 0  # the NIC's number for it (the order wires were made)
        # replies awaited from a real peer, by tag (one per tag: a retransmission's reply is
        # whichever comes first), and datagrams awaited from the traffic generator, in order:
        # [due times, index of the next, what the clock awaits for them (or None)]
        self.awaited: dict[Tag, Awaited] = {}
        self.fifo: collections.deque[list[Any]] = collections.deque()
        self.lost = 0  # awaited inputs that never came (counted when the clock gave up)
        self.datagrams = 0  # datagrams (UDP) or reads (TCP) taken from the real socket
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.sock.local_str() if self.sock else self.fd}>"

    # ---- what is awaited from this wire --------------------------------------------------------

    def sent(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """The host sent `data` to the peer: await the replies it asks for (`link.PeerLink`)."""
        link, framer = self.link, self.framer
        if link is None:
            return
        link.requests += 1
        departed = link.depart(now, len(data))
        if framer is None or self.clock is None or link.down_since is not None:
            # While the peer is down (refused, reset, silent) nothing is promised: the clock
            # follows the wall clock and does not hold for a reply that may never come; what
            # does come is seen when it arrives.
            return
        due = departed + link.rtt
        awaited = self.awaited
        for tag in framer.sent(data):
            if tag not in awaited:
                awaited[tag] = self.clock.expect(due, self)

    def expect_datagrams(self, dues: list[float]) -> None:
        """The traffic generator sent datagrams to this wire's port, due at these times (in order)."""
        a = self.clock.expect(dues[0], self) if self.clock is not None else None
        self.fifo.append([dues, 0, a])

    def _due_fifo(self, now: float) -> float:
        fifo = self.fifo
        if not fifo:
            return now
        group = fifo[0]
        dues, i, a = group
        due = dues[i]
        i += 1
        if i == len(dues):  # the clock awaited the group as one, from its first due time
            fifo.popleft()
            if a is not None:
                self.clock.arrived(a)  # type: ignore[union-attr]
        else:
            group[1] = i
        return due

    def _due_reply(self, tag: Tag | None, nbytes: int, end: bool, now: float) -> float:
        if tag is None:
            return now
        a = self.awaited.get(tag)
        if a is None:
            return now  # unsolicited, or after the clock stopped waiting for it
        if end:
            del self.awaited[tag]
            self.clock.arrived(a)  # type: ignore[union-attr]
            if self.link is not None:
                self.link.replies += 1
        return a.due + (self.link.serialization(nbytes) if self.link is not None else 0.0)

    def late(self, a: Awaited) -> None:
        """The clock gave up on `a` (emu.kernel.clock): a lost datagram, or a silent peer."""
        self.lost += 1
        if self.link is not None and a in self.awaited.values():
            # A peer silent for the whole grace is down: the other replies it owes will not come
            # either, and waiting a grace for each in turn would freeze the host for minutes.
            self.lost += len(self.awaited) - 1
            self._forget_awaited()
        for tag, w in list(self.awaited.items()):
            if w is a:
                del self.awaited[tag]
        for group in self.fifo:
            if group[2] is a:  # the rest of that group never came either
                dues = group[0]
                self.lost += len(dues) - group[1] - 1
                group[1] = len(dues)
                group[2] = None
        while self.fifo and self.fifo[0][1] >= len(self.fifo[0][0]):
            self.fifo.popleft()
        self._peer_down()

    def _peer_down(self) -> None:
        link, clock = self.link, self.clock
        if link is not None and clock is not None:
            link.mark_down(clock.now)
            clock.peer_down(link.name)

    def _peer_heard(self) -> None:
        link, clock = self.link, self.clock
        if link is not None and clock is not None:
            if link.down_since is not None:
                link.mark_up(clock.current_time())
            if clock.realtime:
                clock.peer_up(link.name)

    def _forget_awaited(self) -> None:
        clock = self.clock
        if clock is not None:
            for a in self.awaited.values():
                clock.arrived(a)
            for group in self.fifo:
                if group[2] is not None:
                    clock.arrived(group[2])
        self.awaited.clear()
        self.fifo.clear()

    def _peer_failed(self) -> None:
        """The real socket failed (refused, reset): nothing more will come on it."""
        self._forget_awaited()
        self._peer_down()

    def stop(self) -> None:
        """The socket is closing: stop the watcher, stop awaiting anything from it."""
        self.closed = True
        self.cancel_scope.cancel()
        self._forget_awaited()

    def rcv_space(self) -> None:
        """The socket's reader freed receive-buffer space (only a TCP wire cares)."""

    def _arrived(self) -> None:
        """New bytes in the ring: tell the NIC when they need it."""
        self._peer_heard()
        nxt = self.next_time()
        if nxt < self.scheduled:
            self.nic.schedule(self, nxt)

    # ---- subclasses --------------------------------------------------------------------------

    def pull(self) -> bool:
        raise NotImplementedError

    def service(self, now: float, cutoff: float) -> int:
        """Hand up to `batch` frames due by `cutoff` to the receive path (inside the NIC's
        poll at `now`); returns how many."""
        raise NotImplementedError

    def next_time(self) -> float:
        raise NotImplementedError

    def head_due(self) -> float:
        """When the first frame in the ring is due (inf: none)."""
        ring = self.ring  # type: ignore[attr-defined]
        return ring[0][0] if ring else math.inf

    async def watch(self) -> None:
        raise NotImplementedError

    def state(self) -> str:
        return ""


class UdpWire(Wire):
    """Drains one real UDP socket (or a port the host has no socket for: `sock` None)."""

    def __init__(self, nic: Nic, sock: Sock | None, raw: _socket.socket, **kw: Any) -> None:
        super().__init__(nic, sock, raw, **kw)
        self.laddr, self.lport = raw.getsockname()[:2]
        self.ring: collections.deque[tuple[float, bytes, str, int]] = collections.deque()

    def pull(self) -> bool:
        """Read everything the real socket holds into the ring; False if it was closed."""
        raw = self.raw
        ring = self.ring
        recvfrom = raw.recvfrom
        framer = self.framer
        fifo = self.fifo
        now = self.clock.now if self.clock is not None else trio.current_time()
        if framer is None and not fifo:
            return self._pull_now(now)
        last = ring[-1][0] if ring else 0.0
        got = 0
        for _ in range(READ_MAX):
            try:
                data, addr = recvfrom(65536)  # one copy, into a bytes of the datagram's size
            except BlockingIOError:
                break
            except OSError as exc:  # e.g. ECONNREFUSED queued by ICMP on a connected socket
                if raw.fileno() == -1:
                    return False  # closed under us: the socket is going away
                self.nic.stat.wire_errors += 1
                if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    self._peer_failed()
                continue
            n = len(data)
            got += 1
            if framer is not None:
                tag = framer.received(data)[0][1] if n else None
                due = self._due_reply(tag, n, True, now)
            elif fifo:
                due = self._due_fifo(now)
            else:
                due = now
            if due < last:
                # A reply due before one read earlier (the real server answered out of order):
                # the ring is kept in due order, as the model's wire would deliver them.
                ring.insert(bisect.bisect_right(ring, due, key=_due_key), (due, data, addr[0], addr[1]))
            else:
                last = due
                ring.append((due, data, addr[0], addr[1]))
        if got:
            self.datagrams += got
            self._arrived()
        return True

    def _pull_now(self, now: float) -> bool:
        """`pull` for a wire whose datagrams are all due when read (traffic, applications'
        sockets): the ring stays in due order by itself, so each datagram is only appended."""
        raw = self.raw
        recvfrom = raw.recvfrom
        ring = self.ring
        append = ring.append
        before = len(ring)
        for _ in range(READ_MAX):
            try:
                data, (saddr, sport) = recvfrom(65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if raw.fileno() == -1:
                    return False
                self.nic.stat.wire_errors += 1
                if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    self._peer_failed()
                continue
            append((now, data, saddr, sport))
        got = len(ring) - before
        if got:
            self.datagrams += got
            self._arrived()
        return True

    async def watch(self) -> None:
        raw = self.raw
        wait_readable = trio.lowlevel.wait_readable
        with self.cancel_scope:
            while not self.closed:
                await wait_readable(raw)
                if not self.pull():
                    return

    def next_time(self) -> float:
        ring = self.ring
        return self.nic.irq_time(ring[0][0]) if ring else math.inf

    def service(self, now: float, cutoff: float) -> int:
        ring = self.ring
        batch = self.nic.batch
        if ring and len(ring) <= batch and ring[-1][0] <= cutoff:
            frames = list(ring)  # all of it is due (the common case)
            ring.clear()
        else:
            popleft = ring.popleft
            frames = []
            for _ in range(batch):
                if not ring or ring[0][0] > cutoff:
                    break
                frames.append(popleft())
        if frames:
            self.nic.rx.udp_list(frames, self.laddr, self.lport)
        return len(frames)

    def state(self) -> str:
        return f"ring {len(self.ring)}" if self.ring else ""


class TcpWire(Wire):
    """Drains one real TCP connection in MSS segments, holding a refused one for re-offer.

    Where the segments are cut and when each is due depend only on the stream and the model,
    never on how the real kernel happened to chunk the bytes it had: a reply is cut into MSS
    segments from its first byte, and segment k is due when the reply's first byte is (a round
    trip after its request left) plus the serialization of the reply up to the end of k.  The
    model's peer answers every request a round trip after it left, so its stream carries the
    replies in the order they are due: where the framer says replies stand alone (RPC records,
    matched by xid) a reply is placed in the ring by its due time, whole, whatever order the real
    server wrote them in; otherwise (iSCSI, in StatSN order) the stream's order is kept and no
    segment is due before the one ahead of it.  The emulated receive window is
    applied when a segment is due (the peer sends nothing past it: the segment waits for the
    window to open, then comes a round trip later); what is read ahead from the real socket is
    bounded by `READ_CAP`, past which the real window closes too.
    """

    def __init__(self, nic: Nic, sock: Sock, raw: _socket.socket, **kw: Any) -> None:
        super().__init__(nic, sock, raw, **kw)
        # (due, segment, first segment of a reply)
        self.ring: collections.deque[tuple[float, bytes, bool]] = collections.deque()
        self.ring_bytes = 0  # read from the real socket and not yet queued (ring, _reply, _seg)
        self._seg = bytearray()  # the segment being cut
        self._reply_off = 0  # bytes of the current reply read so far
        self._reply: list[tuple[float, bytes, bool]] = []  # its segments, while it is incomplete
        self._in_order = self.framer.in_order if self.framer is not None else True  # a plain stream is in order
        self._last_due = 0.0  # stream order
        self.rto = nic.tcp_rto_min
        self.reoffer_at: float | None = None  # a segment is held until then
        self.held_since: float | None = None
        self.window_wait = False  # the head segment waits for the receive window to open
        self.reoffers = 0  # held segments offered again (the peer's retransmissions)
        self.eof = False
        self.error: OSError | None = None
        self._suspended: list[tuple[Tag, Awaited]] = []
        self._ready = trio.lowlevel.ParkingLot()  # the watcher, waiting for the ring to drain

    # ---- reading -------------------------------------------------------------------------------

    def pull(self) -> bool:
        """Read what the real socket holds (up to READ_CAP ahead) into the ring; False once the
        stream ended or failed (after which nothing more is read)."""
        if self.eof or self.error is not None:
            return False
        room = READ_CAP - self.ring_bytes
        if room <= 0:
            return True
        try:
            data = self.raw.recv(min(room, 65536))
        except BlockingIOError:
            return True
        except OSError as exc:
            if self.raw.fileno() == -1:
                self.eof = True
                return False
            self.nic.stat.wire_errors += 1
            self.error = exc
            self._peer_failed()
            self._end_of_stream()
            return False
        if not data:
            self.nic.stat.wire_eof += 1
            self.eof = True
            if self.awaited:
                # The peer closed with requests unanswered (killed, restarting): their replies
                # cannot come on this connection, so the clock stops holding for them at once.
                self._peer_failed()
            self._end_of_stream()
            return False
        self.datagrams += 1
        now = self.clock.now if self.clock is not None else trio.current_time()
        framer = self.framer
        if framer is None:  # nothing to tell replies apart: what was read is due now
            self._cut(data, None, True, now)
        else:
            pos = 0
            for nbytes, tag, end in framer.received(data):  # type: ignore[misc]
                self._cut(data[pos:pos + nbytes], tag, end, now)
                pos += nbytes
        self.ring_bytes += len(data)
        if self.ring_bytes >= READ_CAP:
            self._suspend()
        self._arrived()
        return True

    def _cut(self, piece: bytes, tag: Tag | None, end: bool, now: float) -> None:
        """Add `piece` of the reply `tag` to the segment being cut; `end`: the reply ends."""
        seg = self._seg
        mss = self.nic.mss
        a = self.awaited.get(tag) if tag is not None else None
        i, n = 0, len(piece)
        while i < n:
            take = min(mss - len(seg), n - i)
            seg += piece[i:i + take]
            i += take
            self._reply_off += take
            if len(seg) >= mss:
                self._emit(a, now)
        if end:
            if seg:
                self._emit(a, now)
            self._reply_off = 0
            if self._reply:
                self._place(self._reply)
                self._reply = []
            if a is not None:
                del self.awaited[tag]
                self.clock.arrived(a)  # type: ignore[union-attr]
                if self.link is not None:
                    self.link.replies += 1

    def _emit(self, a: Awaited | None, now: float) -> None:
        if a is not None:
            due = a.due + (self.link.serialization(self._reply_off) if self.link is not None else 0.0)
        else:
            due = now  # unsolicited, or after the clock stopped waiting for it
        if due < self._last_due:
            due = self._last_due
        seg = (due, bytes(self._seg), self._reply_off <= len(self._seg))
        self._seg.clear()
        if self._in_order:
            self._last_due = due
            self.ring.append(seg)
        else:
            self._reply.append(seg)

    def _place(self, reply: list[tuple[float, bytes, bool]]) -> None:
        """Put a whole reply into the ring before the first reply due after it (never inside
        another reply, nor before one the NIC has begun to offer)."""
        ring = self.ring
        d0 = reply[0][0]
        if not ring or ring[-1][0] <= d0:
            ring.extend(reply)
            return
        offered = self.held_since is not None or self.window_wait or not ring[0][2]
        at = len(ring)
        for i, seg in enumerate(ring):
            if seg[2] and seg[0] > d0 and not (i == 0 and offered):
                at = i
                break
        for k, seg in enumerate(reply):
            ring.insert(at + k, seg)

    def _end_of_stream(self) -> None:
        if self._seg:  # an incomplete reply: deliver what came
            self._emit(None, self.clock.now if self.clock is not None else trio.current_time())
        if self._reply:
            self.ring.extend(self._reply)
            self._reply = []
        if not self.ring:
            self._signal_end()
        else:
            self._arrived()

    def _signal_end(self) -> None:
        sock = self.sock
        assert sock is not None
        if self.error is not None:
            sock.rx_error(self.error)
        else:
            sock.rx_eof()

    def rcv_space(self) -> None:
        """The socket's reader freed receive-buffer space: a window update to the peer, whose
        next segment comes a round trip later."""
        if self.window_wait:
            self.window_wait = False
            now = self.clock.now if self.clock is not None else trio.current_time()
            self.reoffer_at = now + (self.link.rtt if self.link is not None else 0.0)
            self.nic.schedule(self, self.reoffer_at)

    def _suspend(self) -> None:
        """READ_CAP bytes read ahead: this wire reads nothing until the ring drains, so what it
        awaits stops holding the clock."""
        clock = self.clock
        if clock is None or self._suspended:
            return
        for tag, a in self.awaited.items():
            if a.live:
                clock.suspend(a)
                self._suspended.append((tag, a))

    def _resume(self) -> None:
        clock = self.clock
        if clock is None or not self._suspended:
            return
        for tag, a in self._suspended:
            if self.awaited.get(tag) is a:
                self.awaited[tag] = clock.resume(a)
        self._suspended.clear()
        self._last_due = max(self._last_due, clock.now)  # nothing read from now on is due earlier

    async def watch(self) -> None:
        wait_readable = trio.lowlevel.wait_readable
        with self.cancel_scope:
            while not self.closed and not self.eof and self.error is None:
                if self.ring_bytes >= READ_CAP:
                    self._suspend()
                    await self._ready.park()
                    continue
                self._resume()
                await wait_readable(self.raw)
                self.pull()

    # ---- processing ----------------------------------------------------------------------------

    def next_time(self) -> float:
        if self.reoffer_at is not None:
            return self.reoffer_at
        if self.window_wait:
            return math.inf  # until rcv_space
        ring = self.ring
        return self.nic.irq_time(ring[0][0]) if ring else math.inf

    def service(self, now: float, cutoff: float) -> int:
        nic = self.nic
        rx = nic.rx
        ring = self.ring
        sock = self.sock
        assert sock is not None
        reoffer = self.reoffer_at is not None
        if reoffer:
            if self.held_since is not None:
                nic.stat.tcp_reoffer += 1  # the held segment, offered again (it was due long ago)
                self.reoffers += 1
            self.reoffer_at = None
        n = 0
        for _ in range(nic.batch):
            if not ring or (ring[0][0] > cutoff and not (reoffer and n == 0)):
                break
            chunk = ring[0][1]
            if sock.tcp_window() < len(chunk):
                # The advertised window is closed: the peer would not have sent this yet.
                self.window_wait = True
                nic.stat.tcp_window_closed += 1
                break
            n += 1
            if rx.tcp(sock, chunk) != QUEUED:
                # Dropped: the peer "retransmits" after RTO; nothing after it meanwhile.
                nic.stat.tcp_held += 1
                if self.held_since is None:
                    self.held_since = now
                self.reoffer_at = now + self.rto
                self.rto = min(self.rto * 2, nic.tcp_rto_max)
                break
            ring.popleft()
            self.ring_bytes -= len(chunk)
            self.rto = nic.tcp_rto_min
            self.held_since = None
        if self.reoffer_at is None and not self.window_wait and not ring and (self.eof or self.error is not None):
            self._signal_end()
        if self.ring_bytes < READ_CAP and self._ready:
            self._ready.unpark_all()  # room again: the watcher may read
        return n

    def state(self) -> str:
        """For ss: how long a segment has been held, and the current RTO."""
        if self.window_wait:
            return "zero window"
        if self.held_since is None:
            return ""
        try:
            now = trio.current_time()
        except RuntimeError:  # outside trio.run (a report printed afterwards)
            return f"held rto {self.rto:g}s"
        return f"held {now - self.held_since:.1f}s rto {self.rto:g}s"
