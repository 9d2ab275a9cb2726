"""The receive path: what happens to every frame the NIC hands up, in softirq context.

netif_receive_skb -> ip_rcv -> (ip_defrag) -> udp_rcv / tcp_v4_rcv -> sock_queue_rcv_skb, as
eight steps, one path for every frame (UDP datagram, IP fragment or TCP segment):

  1. allocate the skb (GFP_ATOMIC, the policy's emergency rule) ..................... NOMEM
     (as a NIC's RX ring: once a refill fails, the rest of that poll is missed) ...... MISSED
  2. an emergency/pfmemalloc skb is processed under PF_MEMALLOC from here on
  3. route cache lookup by (source, destination); a miss allocates an entry ....... NOROUTE
  4. fragments join their reassembly queue ................................ FRAG_NOMEM/DUP_FRAG
  5. demultiplex to the emulated socket ........................................ NO_SOCKET
  6. a reserve skb for a socket that is not SOCK_MEMALLOC ...................... PFMEMALLOC
  7. over the socket's receive buffer (reserve skbs for a memalloc socket bypass it) . RCVBUFF
  8. queue on the socket; the memory stays charged until its owner reads it ........ QUEUED

`RxPath` is sans-IO: the wires (wire.py) read the real sockets and call `begin(now, sock)`, then
`udp()` / `tcp()` per frame, then `end()` once per NAPI poll.  Per-poll state is what makes the
common case cheap without a second copy of the steps: the route of the last source, the socket a
poll is for, the RX skb allocator's memo of failed ordinary attempts, the slab array caches (an skb
dropped in a poll is reused by the next frame of the same poll, as SLAB's per-CPU array cache does)
and counters summed per poll.  Steps 6-8 are `Sock.queue_rcv_skb`; skb memory is only ever touched
through `SkbAllocator`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emu.kernel.sched import memalloc_noreclaim
from emu.net.netstat import (
    FRAG_QUEUED,
    MISSED,
    NO_SOCKET,
    NOMEM,
    NOROUTE,
    QUEUED,
    VERDICTS,
)
from emu.net.skbuff import SkBuff

if TYPE_CHECKING:
    from emu.kernel.cpu import Cpu
    from emu.net.ipfrag import FragQueues
    from emu.net.netstat import NetStat
    from emu.net.route import RouteCache, RtEntry
    from emu.net.skbuff import SkbAllocator
    from emu.net.sock import Sock

IP_HDR = 20
UDP_HDR = 8
TCP_HDR = 32  # with the timestamp option, as Linux sends it on loopback
MTU_DEFAULT = 1500
MSS_DEFAULT = MTU_DEFAULT - IP_HDR - TCP_HDR  # 1448
IPPROTO_UDP = 17

_NV = len(VERDICTS)


def ip_fragments(ip_payload: int, mtu: int = MTU_DEFAULT) -> tuple[tuple[int, int, bool], ...]:
    """How ip_fragment cuts an IP payload of `ip_payload` bytes: [(offset, length, more_fragments)].

    One piece if it fits (`ip_payload + 20 <= mtu`); otherwise pieces of `(mtu - 20) & ~7` bytes
    (offsets are in units of 8), the last one shorter.  For a UDP datagram of L payload bytes and
    MTU 1500 that is ceil((L + 8) / 1480) fragments.
    """
    got = _frag_cache.get((ip_payload, mtu))
    if got is not None:
        return got
    if ip_payload < 0:
        raise ValueError("negative payload")
    if ip_payload + IP_HDR <= mtu:
        out: tuple[tuple[int, int, bool], ...] = ((0, ip_payload, False),)
    else:
        per = (mtu - IP_HDR) & ~7
        if per <= 0:
            raise ValueError(f"MTU {mtu} too small to fragment")
        pieces = []
        off = 0
        while off < ip_payload:
            n = min(per, ip_payload - off)
            pieces.append((off, n, off + n < ip_payload))
            off += n
        out = tuple(pieces)
    if len(_frag_cache) < 4096:
        _frag_cache[(ip_payload, mtu)] = out
    return out


_frag_cache: dict[tuple[int, int], tuple[tuple[int, int, bool], ...]] = {}


def udp_frames(payload: int, mtu: int = MTU_DEFAULT) -> int:
    """Frames (fragments) a UDP datagram of `payload` bytes arrives as."""
    return len(ip_fragments(payload + UDP_HDR, mtu))


class RxPath:
    """Steps 1-8 for the frames of one host (module docstring)."""

    def __init__(self, skbs: SkbAllocator, routes: RouteCache, frags: FragQueues,
                 udp_table: dict[int, Sock], tcp_table: dict[tuple[int, str, int], Sock],
                 stat: NetStat, cpu: Cpu, *, mtu: int = MTU_DEFAULT) -> None:
        if mtu < 68:
            raise ValueError(f"MTU {mtu} is below the IPv4 minimum of 68")
        self.skbs = skbs
        self.zone = skbs.zone
        self.routes = routes
        self.rtable = routes.table
        self.frags = frags
        self.udp_table = udp_table
        self.tcp_table = tcp_table
        self.stat = stat
        self.cpu = cpu
        self.frame_cost = cpu.costs.rx_frame
        self.mtu = mtu
        self.max_single = mtu - IP_HDR - UDP_HDR  # the largest UDP payload of one frame
        self.ip_id = 0
        # per poll
        self.now = 0.0
        self.ring_ok = True
        self.counts = [0] * _NV
        self.frames = 0
        self.nbytes = 0
        self.route_hits = 0
        self.emergency_queued = 0
        self._rt_key: tuple[str, str] | None = None
        self._rt: RtEntry | None = None
        self._sock: Sock | None = None
        self._port = -1
        self._port_sk: Sock | None = None

    # ---- the poll ---------------------------------------------------------------------------------

    def begin(self, now: float, sock: Sock | None) -> None:
        """A NAPI poll of the wire of `sock` starts (None: a port the host has no socket on)."""
        self.now = now
        self.ring_ok = True
        self._sock = sock
        self._rt_key = None
        self._port = -1
        skbs = self.skbs
        if skbs.rx_failed:
            skbs.rx_failed.clear()
        self.zone.begin_poll()

    def end(self) -> None:
        """The poll ends: slab array caches flushed, counters added, readers woken, CPU charged."""
        self.zone.end_poll()
        counts = self.counts
        frames = self.frames
        stat = self.stat
        if frames:
            stat.frames += frames
            stat.bytes += self.nbytes
            stat.route_hits += self.route_hits
            stat.route_lookups += self.route_hits
            stat.count(counts)
            if self.emergency_queued:
                stat.delivered_emergency += self.emergency_queued
            sk = self._sock
            if sk is not None:
                for v in range(2, _NV):
                    if counts[v]:
                        sk.count_drops(VERDICTS[v][0], counts[v])
                if counts[QUEUED]:
                    sk.data_ready()
            self.cpu.charge(frames * self.frame_cost)
            self.counts = [0] * _NV
            self.frames = self.nbytes = self.route_hits = self.emergency_queued = 0
        self._sock = None
        self._port_sk = None

    # ---- UDP ----------------------------------------------------------------------------------

    def udp(self, data: bytes, saddr: str, sport: int, daddr: str, dport: int) -> int:
        """One UDP datagram as drained from a real socket: one frame, or its fragments.  Returns
        the verdict of its last frame."""
        n = len(data)
        if n <= self.max_single:
            v = self._udp_frame(n + IP_HDR + UDP_HDR, data, saddr, sport, daddr, dport, None)
            self.counts[v] += 1
            return v
        self.ip_id = ip_id = (self.ip_id + 1) & 0xFFFF
        key = (saddr, daddr, ip_id, IPPROTO_UDP)
        v = QUEUED
        for off, length, more in ip_fragments(n + UDP_HDR, self.mtu):
            self.stat.frags += 1
            frag = (key, off, length, more)
            v = self._udp_frame(length + IP_HDR, data if off == 0 else None, saddr, sport, daddr, dport, frag)
            self.counts[v] += 1
        return v

    def _udp_frame(self, size: int, payload: bytes | None, saddr: str, sport: int, daddr: str,
                   dport: int, frag: tuple[tuple[str, str, int, int], int, int, bool] | None) -> int:
        self.frames += 1
        self.nbytes += size
        if not self.ring_ok:  # step 1
            return MISSED
        skb = self.skbs.rx(size)
        if skb is None:
            self.ring_ok = False
            return NOMEM
        skb.data = payload
        skb.saddr = saddr
        skb.sport = sport
        if skb.memalloc:  # step 2
            with memalloc_noreclaim():
                return self._ip_rcv(skb, saddr, daddr, dport, frag)
        return self._ip_rcv(skb, saddr, daddr, dport, frag)

    def _ip_rcv(self, skb: SkBuff, saddr: str, daddr: str, dport: int,
                frag: tuple[tuple[str, str, int, int], int, int, bool] | None) -> int:
        if not self._route(skb, saddr, daddr):  # step 3
            return NOROUTE
        if frag is not None:  # step 4
            key, off, length, more = frag
            memalloc = skb.memalloc
            whole = self.frags.queue_fragment(skb, key, off, length, more, skb.data, self.now)
            if whole is None:
                return FRAG_QUEUED
            if whole.__class__ is int:
                return whole  # type: ignore[return-value]
            skb = whole  # type: ignore[assignment]
            if skb.memalloc and not memalloc:  # a reserve fragment made it a reserve datagram
                with memalloc_noreclaim():
                    return self._udp_deliver(skb, dport)
        return self._udp_deliver(skb, dport)

    def _udp_deliver(self, skb: SkBuff, dport: int) -> int:
        if dport != self._port:  # step 5, once per poll (a wire's frames share a port)
            self._port = dport
            self._port_sk = self.udp_table.get(dport)
        sk = self._port_sk
        if sk is None:
            self.skbs.free(skb)
            return NO_SOCKET
        v = sk.queue_rcv_skb(skb)  # steps 6-8
        if v == QUEUED and skb.memalloc:
            self.emergency_queued += 1
        return v

    def _route(self, skb: SkBuff, saddr: str, daddr: str) -> bool:
        """Step 3: ip_route_input.  The last hit is remembered for the poll: a flood comes from
        a few sources, and within one poll nothing else changes the cache."""
        key = (saddr, daddr)
        if key == self._rt_key:
            self.route_hits += 1
            return True
        rt = self.rtable.get(key)
        if rt is not None:
            rt.lastuse = self.now
            self.route_hits += 1
            self._rt_key = key
            return True
        self._rt_key = None
        if self.routes.input(saddr, daddr, self.now) is None:  # a miss: allocate an entry
            self.skbs.free(skb)
            return False
        return True

    # ---- TCP ----------------------------------------------------------------------------------

    def tcp(self, sk: Sock, chunk: bytes) -> int:
        """One segment of a connection; any verdict but QUEUED means dropped (the wire holds it
        for re-offer, as the peer would retransmit it)."""
        size = len(chunk) + IP_HDR + TCP_HDR
        self.frames += 1
        self.nbytes += size
        if not self.ring_ok:  # step 1
            v = MISSED
        else:
            skb = self.skbs.rx(size)
            if skb is None:
                self.ring_ok = False
                v = NOMEM
            else:
                skb.data = chunk
                skb.saddr = sk.raddr
                skb.sport = sk.rport
                if skb.memalloc:  # step 2
                    with memalloc_noreclaim():
                        v = self._tcp_rcv(skb, sk)
                else:
                    v = self._tcp_rcv(skb, sk)
        self.counts[v] += 1
        return v

    def _tcp_rcv(self, skb: SkBuff, sk: Sock) -> int:
        if not self._route(skb, sk.raddr, sk.laddr):  # step 3
            return NOROUTE
        if self.tcp_table.get((sk.lport, sk.raddr, sk.rport)) is not sk:  # step 5
            self.skbs.free(skb)
            return NO_SOCKET
        v = sk.queue_rcv_skb(skb)  # steps 6-8
        if v == QUEUED and skb.memalloc:
            self.emergency_queued += 1
        return v
