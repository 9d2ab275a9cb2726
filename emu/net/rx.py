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

`RxPath` is sans-IO: the NIC (wire.py) calls `begin(now)` at each interrupt, then `udp()` /
`tcp()` for every frame due, then `end()`.  Per-poll state is what makes the common case cheap
without a second copy of the steps: the route of the last source, the socket of the last port,
the RX skb allocator's memo of failed ordinary attempts, the slab array caches (an skb dropped in a
poll is reused by the next frame of the same poll, as SLAB's per-CPU array cache does), the CPU
charged once, and counters summed per poll.  Every drop is also counted on the socket the frame
was for (`Sock.rx_drops`), before demux included: the kernel could not know it, the emulator
can.  Steps 6-8 are `Sock.queue_rcv_skb`; skb memory is only ever touched through
`SkbAllocator`.  A run of like frames (same source and port, ordinary skbs, all accepted) takes
the steps once for the run: `SkbAllocator.rx_bulk` gives an `SkbRun` (the frames' sizes and
data as arrays, no object per frame) and `Sock.queue_rcv_run` queues it whole; every count and
every byte charged is what the frames one by one would have given.
"""

from __future__ import annotations

from operator import itemgetter
from typing import TYPE_CHECKING

from emu.kernel.sched import memalloc_noreclaim
from emu.net.netstat import (
    FRAG_QUEUED,
    MISSED,
    NO_SOCKET,
    NOMEM,
    NOROUTE,
    PFMEMALLOC,
    QUEUED,
    RCVBUFF,
    RESERVE_SKB,
    VERDICTS,
)
from emu.net.skbuff import SKB_OVERHEAD, SkBuff

if TYPE_CHECKING:
    from emu.kernel.cpu import Cpu
    from emu.net.capture import PacketTap
    from emu.net.ipfrag import FragQueues
    from emu.net.netstat import NetStat
    from emu.net.route import RouteCache
    from emu.net.skbuff import SkbAllocator
    from emu.net.sock import Sock

IP_HDR = 20
UDP_HDR = 8
TCP_HDR = 32  # with the timestamp option, as Linux sends it on loopback
MTU_DEFAULT = 1500
MSS_DEFAULT = MTU_DEFAULT - IP_HDR - TCP_HDR  # 1448
IPPROTO_UDP = 17

_NV = len(VERDICTS)
_DATA, _SADDR = itemgetter(1), itemgetter(2)  # of a wire's (due, data, saddr, sport)


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
        self.skbs_got = 0
        self.skbs_reserve = 0
        self._last_reserve = False
        self._rt_key: tuple[str, str] | None = None
        self._port = -1
        self._port_sk: Sock | None = None
        self._ready: list[Sock] = []  # sockets something was queued on in this poll
        # An observer (emu.net.capture.PacketTap, `--pcap`): None unless capturing.  Then `trace`
        # gets one entry per frame where its verdict is counted (| RESERVE_SKB for a reserve skb).
        self.tap: PacketTap | None = None
        self.trace: list[int] | None = None

    # ---- the poll ---------------------------------------------------------------------------------

    def begin(self, now: float) -> None:
        """The NIC's interrupt at `now`: a NAPI poll starts."""
        self.now = now
        self.ring_ok = True
        self._rt_key = None
        self._port = -1
        skbs = self.skbs
        if skbs.rx_failed:
            skbs.rx_failed.clear()
        self.zone.begin_poll()

    def end(self) -> None:
        """The poll ends: slab array caches flushed, counters added, readers woken, CPU charged."""
        self.zone.end_poll()
        frames = self.frames
        if frames:
            stat = self.stat
            stat.frames += frames
            stat.bytes += self.nbytes
            stat.route_hits += self.route_hits
            stat.route_lookups += self.route_hits
            stat.count(self.counts)
            if self.emergency_queued:
                stat.delivered_emergency += self.emergency_queued
            stat.skbs += self.skbs_got
            stat.skbs_emergency += self.skbs_reserve
            for sk in self._ready:
                sk.ready = False
                sk.data_ready()
            self._ready.clear()
            self.cpu.charge(frames * self.frame_cost)
            self.counts = [0] * _NV
            self.frames = self.nbytes = self.route_hits = self.emergency_queued = 0
            self.skbs_got = self.skbs_reserve = 0
        self._port_sk = None

    def _drop(self, v: int, sk: Sock | None) -> int:
        """Count a drop on the socket the frame was for (diagnostics, before demux included)."""
        if sk is not None:
            sk.count_drops(VERDICTS[v][0])
        return v

    # ---- UDP ----------------------------------------------------------------------------------

    def udp_list(self, frames: list[tuple[float, bytes, str, int]], daddr: str, dport: int,
                 verdicts: list[int] | None = None) -> None:
        """A wire's due datagrams, (due, data, saddr, sport) each, in order (their verdicts are
        appended to `verdicts` if given: one per datagram, the last fragment's for a fragmented one).

        Each goes through the steps exactly as `udp` takes it alone; runs of like frames (one
        frame each, the same length, routes cached) are taken together where the outcome of
        one frame provably equals taking them one by one:
        - accepted in bulk while the socket has room and the slab caches hold free objects
          (`SkbAllocator.rx_bulk`: no page allocation, so no watermark decision can differ);
        - a drop that left the state it found (the skb came from the poll's array cache and went
          back to it, nothing else moved) repeats for every like frame after it: counted at once.
        tests/unit/net/test_poll_fast_path.py checks that a poll leaves the state of the same
        frames taken one per poll."""
        if dport != self._port:
            self._port = dport
            self._port_sk = self.udp_table.get(dport)
        sk = self._port_sk
        max_single = self.max_single
        udp = self.udp
        routes = self.routes
        i = 0
        n = len(frames)
        fast = True
        while i < n:
            _, data, saddr, sport = frames[i]
            ln = len(data)
            if ln > max_single or sk is None or n - i == 1:
                v = udp(data, saddr, sport, daddr, dport)
                if verdicts is not None:
                    verdicts.append(v)
                i += 1
                continue
            if not self.ring_ok:  # step 1 failed in this poll: the rest is missed, touching nothing
                j = i + 1
                while j < n and len(frames[j][1]) == ln:
                    j += 1
                if verdicts is not None:
                    verdicts.extend([MISSED] * (j - i))
                i = self._repeat_drop(MISSED, frames, i, j, ln, sk)
                continue
            j = self._like_run(frames, i, ln, daddr, fast)
            fast = j == n  # a failed fast check is not tried again in this call (bounded cost)
            version = routes.version
            while i < j:
                if not self.ring_ok:
                    break  # the rest of the run is missed (above)
                if j - i > 1:
                    q = self._accept_run(frames, i, j, ln, sk, daddr)
                    if q:
                        if verdicts is not None:
                            verdicts.extend([QUEUED] * q)
                        i += q
                        continue
                _, data, saddr, sport = frames[i]
                before = self._fingerprint(sk) if j - i > 1 else None
                v = udp(data, saddr, sport, daddr, dport)
                if verdicts is not None:
                    verdicts.append(v)
                i += 1
                if routes.version != version:
                    break  # the cache changed (a miss, a GC): find the run again from here
                if before is not None and v > FRAG_QUEUED and self._fingerprint(sk) == before:
                    if verdicts is not None:
                        verdicts.extend([v] * (j - i))
                    i = self._repeat_drop(v, frames, i, j, ln, sk)
        if self.tap is not None:
            self.tap.udp(frames, daddr, dport, sk, self.trace, self.now)  # type: ignore[arg-type]
            self.trace.clear()  # type: ignore[union-attr]

    def _like_run(self, frames: list[tuple[float, bytes, str, int]], i: int, ln: int, daddr: str,
                  fast: bool = True) -> int:
        """frames[i:j] are single frames of length `ln` whose routes are cached (from i+1 on;
        their last use is this poll).  `fast`: first try whether that holds for all the rest."""
        routes = self.routes
        now = self.now
        n = len(frames)
        rest = frames[i + 1:] if fast else None
        # the common case at C speed: all the same length, from sources whose routes are cached
        if fast and rest and set(map(len, map(_DATA, rest))) == {ln} \
                and routes.hit_all(set(map(_SADDR, rest)), daddr, now):
            return n
        last = None
        j = i + 1
        while j < n:
            f = frames[j]
            if len(f[1]) != ln:
                break
            saddr = f[2]
            if saddr != last:
                if not routes.hit(saddr, daddr, now):
                    break
                last = saddr
            j += 1
        return j

    def _accept_run(self, frames: list[tuple[float, bytes, str, int]], i: int, j: int, ln: int, sk: Sock,
                    daddr: str) -> int:
        """Queue frames[i:j] at once as far as the socket's room and the slabs' free objects go;
        returns how many (0: the first frame goes the single way)."""
        saddr = frames[i][2]
        if (saddr, daddr) not in self.rtable:
            return 0  # step 3 would allocate a route: the single way
        size = ln + IP_HDR + UDP_HDR
        truesize = size + SKB_OVERHEAD
        k = min(j - i, sk.rcv_room(truesize))
        if k <= 0:
            return 0
        run = self.skbs.rx_bulk(size, k, frames[i:i + k], ln)
        if run is None:
            return 0
        q = len(run)
        self.routes.hit(saddr, daddr, self.now)
        sk.queue_rcv_run(run)
        self.frames += q
        self.nbytes += q * size
        self.counts[QUEUED] += q
        if self.trace is not None:
            self.trace.extend([QUEUED] * q)
        self.route_hits += q
        self.skbs_got += q
        if not sk.ready:
            sk.ready = True
            self._ready.append(sk)
        return q

    def _fingerprint(self, sk: Sock) -> tuple[object, ...]:
        """What a frame's processing could change that the next like frame would notice."""
        skbs = self.skbs
        node = skbs.skb_data
        zone = self.zone
        polled = zone.poll_ac or ()
        return (zone.nr_free, zone.nr_pfmemalloc, zone.nr_slab_free, skbs.live, skbs.live_truesize,
                sk.sk_rmem_alloc, len(sk.receive_queue), self.ring_ok, len(self.rtable), self.frags.ip_frag_mem,
                len(self.frags.queues), tuple(len(c._ac) for c in polled), tuple(skbs.rx_failed.items()),
                node.usage if node is not None else 0)

    def _repeat_drop(self, v: int, frames: list[tuple[float, bytes, str, int]], i: int, j: int, ln: int,
                     sk: Sock) -> int:
        """The frame before frames[i] was dropped (verdict `v`) and left everything as it found
        it: frames[i:j], like it, go the same way.  Counted at once; returns j."""
        r = j - i
        self.frames += r
        self.nbytes += r * (ln + IP_HDR + UDP_HDR)
        self.counts[v] += r
        sk.count_drops(VERDICTS[v][0], r, after_demux=v == PFMEMALLOC or v == RCVBUFF)
        if self.trace is not None:
            self.trace.extend([v | RESERVE_SKB if v != NOMEM and v != MISSED and self._last_reserve else v] * r)
        if v != NOMEM and v != MISSED:
            # each repeat took an skb (from the array cache) and gave it back: it passed step 3
            self.route_hits += r
            self.skbs_got += r
            self.skbs.rx_repeated(r, self._last_reserve)
            if self._last_reserve:
                self.skbs_reserve += r
        return j

    def udp(self, data: bytes, saddr: str, sport: int, daddr: str, dport: int) -> int:
        """One UDP datagram as drained from a real socket: one frame, or its fragments.  Returns
        the verdict of its last frame."""
        if dport != self._port:  # the socket it is for, once per poll and port
            self._port = dport
            self._port_sk = self.udp_table.get(dport)
        n = len(data)
        if n <= self.max_single:
            return self._tally(self._udp_frame(n + IP_HDR + UDP_HDR, data, saddr, sport, daddr, dport, None))
        self.ip_id = ip_id = (self.ip_id + 1) & 0xFFFF
        key = (saddr, daddr, ip_id, IPPROTO_UDP)
        v = QUEUED
        for off, length, more in ip_fragments(n + UDP_HDR, self.mtu):
            self.stat.frags += 1
            frag = (key, off, length, more)
            v = self._tally(self._udp_frame(length + IP_HDR, data if off == 0 else None, saddr, sport, daddr,
                                            dport, frag))
        return v

    def _tally(self, v: int) -> int:
        """One UDP frame's verdict counted (a drop on the socket it was for) and traced."""
        self.counts[v] += 1
        if v > FRAG_QUEUED:
            self._drop(v, self._port_sk)
        if self.trace is not None:
            self.trace.append(v | RESERVE_SKB if v != NOMEM and v != MISSED and self._last_reserve else v)
        return v

    def _udp_frame(self, size: int, payload: bytes | None, saddr: str, sport: int, daddr: str,
                   dport: int, frag: tuple[tuple[str, str, int, int], int, int, bool] | None) -> int:
        self.frames += 1
        self.nbytes += size
        skb = self._skb_rx(size, payload, saddr, sport, None if payload is None or frag is not None else len(payload))
        if isinstance(skb, int):
            return skb
        self._last_reserve = skb.memalloc != 0
        if skb.memalloc:  # step 2
            with memalloc_noreclaim():
                return self._ip_rcv(skb, saddr, daddr, dport, frag)
        return self._ip_rcv(skb, saddr, daddr, dport, frag)

    def _skb_rx(self, size: int, data: bytes | None, saddr: str, sport: int, length: int | None) -> SkBuff | int:
        """Step 1, for every frame: an RX skb of `size` carrying `data` (`length` payload bytes;
        None: a fragment's, set by reassembly), or the verdict MISSED / NOMEM."""
        if not self.ring_ok:
            return MISSED
        skb = self.skbs.rx(size)
        if skb is None:
            self.ring_ok = False  # an RX ring that could not be refilled: the rest of the poll is missed
            return NOMEM
        self.skbs_got += 1
        if skb.memalloc:
            self.skbs_reserve += 1
        if length is not None:
            skb.len = length
        skb.data = data
        skb.saddr = saddr
        skb.sport = sport
        return skb

    def _deliver(self, skb: SkBuff, sk: Sock) -> int:
        """Steps 6-8 (`Sock.queue_rcv_skb`) for a frame of either protocol; a queued one marks its
        socket for the poll's wake-up."""
        v = sk.queue_rcv_skb(skb)
        if v == QUEUED:
            if skb.memalloc:
                self.emergency_queued += 1
            if not sk.ready:
                sk.ready = True
                self._ready.append(sk)
        return v

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
        sk = self._port_sk if dport == self._port else self.udp_table.get(dport)  # step 5
        if sk is None:
            self.skbs.free(skb)
            return NO_SOCKET
        return self._deliver(skb, sk)

    def _route(self, skb: SkBuff, saddr: str, daddr: str) -> bool:
        """Step 3: ip_route_input.  The last hit is remembered for the poll: a flood comes from
        a few sources, and within one poll nothing else changes the cache."""
        key = (saddr, daddr)
        if key == self._rt_key or self.routes.hit(saddr, daddr, self.now):
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
        skb = self._skb_rx(size, chunk, sk.raddr, sk.rport, len(chunk))  # step 1
        reserve = False
        if isinstance(skb, int):
            v = skb
        elif skb.memalloc:  # step 2
            reserve = True
            with memalloc_noreclaim():
                v = self._tcp_rcv(skb, sk)
        else:
            v = self._tcp_rcv(skb, sk)
        self.counts[v] += 1
        if v > FRAG_QUEUED:
            self._drop(v, sk)
        if self.tap is not None:
            self.tap.tcp(sk, chunk, v, reserve, self.now)
        return v

    def _tcp_rcv(self, skb: SkBuff, sk: Sock) -> int:
        if not self._route(skb, sk.raddr, sk.laddr):  # step 3
            return NOROUTE
        if self.tcp_table.get((sk.lport, sk.raddr, sk.rport)) is not sk:  # step 5
            self.skbs.free(skb)
            return NO_SOCKET
        return self._deliver(skb, sk)
