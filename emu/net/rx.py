"""The NIC receive stage: DESIGN §6 steps 1-8 for every frame, in softirq context.

Wires (wire.py) hand frames over synchronously; nothing here sleeps.

  1. allocate the skb (GFP_ATOMIC, the policy's emergency rule) ........ else drop rx_nomem
     (as a NIC driver's RX ring: once a refill fails, the rest of that poll's frames are missed
     without further allocation attempts; the next poll tries again)
  2. an emergency/pfmemalloc skb is processed under PF_MEMALLOC from here on
  3. route cache lookup by (source, destination) ........................ else drop route_nomem
  4. fragments join their reassembly queue (a complete datagram continues)
  5. demultiplex to the emulated socket ................................ else drop no_socket
  6. a reserve skb for a socket that is not SOCK_MEMALLOC ................ drop pfmemalloc_drop
  7. over the socket's receive buffer .................................... drop rcvbuf_full
     (reserve skbs for a memalloc socket bypass this: the stream-deadlock fix)
  8. queue on the socket; the memory stays charged until the owner reads it

A UDP drop loses the datagram.  A TCP drop returns False to the wire, which holds the chunk and
offers it again after a retransmission timeout.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import trio

from emu.mm.gfp import GFP_ATOMIC
from emu.mm.sched import TaskFlags, memalloc_noreclaim, softirq, task
from emu.net.netstat import NetStat, ss  # re-exported: CONTRACT.md names them here
from emu.net.skbuff import SKB_OVERHEAD, SkBuff
from emu.mm.gfp import Policy
from emu.net.wire import IP_HDR, MSS_DEFAULT, MTU_DEFAULT, TCP_HDR, UDP_HDR, TCP_RTO_MAX, TCP_RTO_MIN, ip_fragments

if TYPE_CHECKING:
    from emu.net.ip import RouteCache
    from emu.net.ipfrag import FragQueues
    from emu.net.netmem import NetMem
    from emu.net.sock import Sock
    from emu.net.wire import UdpWire

IPPROTO_UDP = 17

__all__ = ["Nic", "NetStat", "ss"]


class Nic:
    """The receive stage of one emulated host, and the tasks (wires, timers) that feed it."""

    def __init__(self, mem: NetMem, stat: NetStat, routes: RouteCache, frags: FragQueues, *,
                 mtu: int = MTU_DEFAULT, batch: int = 64, tcp_rto_min: float = TCP_RTO_MIN,
                 tcp_rto_max: float = TCP_RTO_MAX, timer_interval: float = 0.1,
                 rt_gc_interval: float = 60.0) -> None:
        if mtu < 68:
            raise ValueError(f"MTU {mtu} is below the IPv4 minimum of 68")
        if batch < 1:
            raise ValueError("batch must be >= 1")
        if not 0 < tcp_rto_min <= tcp_rto_max:
            raise ValueError("need 0 < tcp_rto_min <= tcp_rto_max")
        self.mem = mem
        self.stat = stat
        self.routes = routes
        self.rtable = routes.table
        self.frags = frags
        self.mtu = mtu
        self.mss = mtu - IP_HDR - TCP_HDR if mtu != MTU_DEFAULT else MSS_DEFAULT
        self.batch = batch
        self.tcp_rto_min = tcp_rto_min
        self.tcp_rto_max = tcp_rto_max
        self.timer_interval = timer_interval
        self.rt_gc_interval = rt_gc_interval  # ip_rt_gc_interval: rt_check_expire's period
        self.udp_table: dict[int, Sock] = {}
        self.tcp_table: dict[tuple[int, str, int], Sock] = {}
        self.ip_id = 0
        self.ring_ok = True  # reset by each wire at the start of each poll (batch)
        self._spawn_send, self._spawn_recv = trio.open_memory_channel[object](math.inf)
        self.ksoftirqd = None

    # ---- wires --------------------------------------------------------------------------------

    def new_poll(self) -> None:
        """A wire starts a poll (a batch): the driver refills its ring, memos of failures go."""
        self.ring_ok = True
        if self.mem.rx_failed:
            self.mem.rx_failed.clear()

    def attach(self, wire: object) -> None:
        """Start draining a wire (as soon as `run` is running)."""
        self._spawn_send.send_nowait(wire)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every wire and the IP timers, as the kernel thread ksoftirqd/0, until cancelled."""
        with task("ksoftirqd/0", TaskFlags.PF_KTHREAD) as t:
            self.ksoftirqd = t
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._timers)
                task_status.started()
                async for wire in self._spawn_recv:
                    if wire.cancel_scope.cancel_called:  # type: ignore[attr-defined]
                        continue  # its socket was closed before the wire got going
                    nursery.start_soon(wire.run)  # type: ignore[attr-defined]

    async def _timers(self) -> None:
        """ip_expire (checked every timer_interval) and rt_check_expire (every ip_rt_gc_interval):
        timers run in softirq too."""
        next_rt = trio.current_time() + self.rt_gc_interval
        while True:
            await trio.sleep(self.timer_interval)
            with softirq():
                now = trio.current_time()
                if self.frags.queues:
                    self.frags.expire(now)
                if now >= next_rt:
                    self.routes.expire(now)
                    next_rt = now + self.rt_gc_interval

    # ---- UDP ----------------------------------------------------------------------------------

    def udp_poll(self, wire: UdpWire, now: float) -> bool:
        """One NAPI poll of a UDP wire: up to `batch` datagrams drained and received, in softirq.

        Returns False if the real socket was closed under us.  The common frame (one fragment, an
        ordinary skb, a cached route, a socket) takes the fast path below, with the counters kept
        in locals and added once per poll (nothing reads them while a poll runs: nothing in it
        sleeps); every other frame goes through `udp_input`, which does the same steps in full.
        """
        self.new_poll()
        raw = wire.raw
        buf = wire.buf
        recvfrom_into = raw.recvfrom_into
        laddr, lport = wire.laddr, wire.lport
        udp_input = self.udp_input
        stat = self.stat
        mem = self.mem
        # Step 5 once a poll: the socket table cannot change while nothing sleeps.
        sk = self.udp_table.get(lport)
        # Without memalloc sockets (or under none) an RX skb is plain GFP_ATOMIC and never a
        # reserve skb (NetMem.rx_skb), so steps 2 and 6 cannot apply.
        fast = sk is not None and (not mem.memalloc_socks or mem.policy is Policy.NONE)
        if fast:
            rtable = self.rtable
            head_cache = mem.head_cache
            head_alloc = head_cache.alloc_obj
            head_free = head_cache.free_obj
            data_caches = mem._data_cache
            max_payload = self.mtu - IP_HDR - UDP_HDR
            queue = sk.receive_queue
            rt_saddr = rt = None  # the last route hit, valid until the general path runs
            cache_size = -1
        frames = nbytes = skbs = hits = delivered = dropped = qbytes = live_truesize = 0
        try:
            for _ in range(self.batch):
                try:
                    n, addr = recvfrom_into(buf)
                except BlockingIOError:
                    break
                except OSError:  # e.g. ECONNREFUSED queued by ICMP on a connected socket
                    if raw.fileno() == -1:  # closed under us: the socket is going away
                        return False
                    stat.wire_errors += 1
                    continue
                if not fast or n > max_payload or not self.ring_ok:
                    udp_input(addr[0], addr[1], laddr, lport, buf[:n], now)
                    rt_saddr = None  # the general path may have changed the route cache
                    continue
                size = n + IP_HDR + UDP_HDR
                truesize = size + SKB_OVERHEAD
                # step 1: both allocations (kmalloc of size + shared info: a cache, as size <= MTU)
                if size != cache_size:  # a flood repeats one size
                    cache = data_caches.get(size) or mem.data_cache(size)
                    data_alloc = cache.alloc_obj
                    cache_size = size
                head = head_alloc(GFP_ATOMIC)
                data_slab = data_alloc(GFP_ATOMIC) if head is not None else None
                frames += 1
                nbytes += size
                if data_slab is None:
                    if head is not None:
                        head_free(head)
                    self._udp_nomem(lport)  # the refill failed: rx_nomem, the rest is rx_missed
                    continue
                skbs += 1
                # step 3, the route cache hit
                saddr = addr[0]
                if saddr != rt_saddr:  # a flood comes from few sources: look up once per run
                    rt = rtable.get((saddr, laddr))
                    if rt is not None:
                        rt_saddr = saddr
                        rt.lastuse = now  # (the same `now` for the whole poll)
                    else:
                        rt_saddr = None
                if rt is None:
                    skb = SkBuff(mem, size, head, data_slab, True)
                    mem.skbs_live += 1
                    mem.skb_truesize_live += truesize
                    skb.data = buf[:n]
                    skb.len = n
                    skb.saddr = saddr
                    skb.sport = addr[1]
                    self._udp_rcv(skb, saddr, laddr, lport, now)  # a miss: allocate an entry
                    continue
                hits += 1
                # step 7 (2.6.22 sock_queue_rcv_skb): ordinary skbs never bypass it
                if sk.sk_rmem_alloc + truesize >= sk.sk_rcvbuf:
                    # dropped: the skb never leaves this function, so no SkBuff is made for it
                    head_free(head)
                    cache.free_obj(data_slab)
                    dropped += 1
                    continue
                # step 8
                skb = SkBuff(mem, size, head, data_slab, True)
                skb.data = buf[:n]
                skb.len = n
                skb.saddr = saddr
                skb.sport = addr[1]
                skb.sk = sk
                queue.append(skb)
                sk.sk_rmem_alloc += truesize
                qbytes += n
                live_truesize += truesize
                delivered += 1
        finally:
            if frames:
                stat.frames += frames
                stat.bytes += nbytes
                stat.skbs += skbs
                stat.route_lookups += hits
                stat.route_hits += hits
                if delivered:
                    stat.delivered += delivered
                    mem.skbs_live += delivered
                    mem.skb_truesize_live += live_truesize
                    sk.rx_queued_bytes += qbytes
                    if sk._readers_waiting:
                        sk._readers_waiting = False
                        sk._readers.unpark_all()
                if dropped:
                    stat.rcvbuf_full += dropped
                    sk.sk_drops += dropped
                    d = sk.rx_drops
                    d["rcvbuf_full"] = d.get("rcvbuf_full", 0) + dropped
                    if mem.rx_failed:
                        mem.rx_failed.clear()  # ordinary objects went back to their slabs
        return True

    def _udp_nomem(self, dport: int) -> None:
        """Step 1 failed on the fast path (its frame is counted there)."""
        self.stat.rx_nomem += 1
        self.ring_ok = False
        self._udp_sk_drop(dport, "rx_nomem")

    def udp_input(self, saddr: str, sport: int, daddr: str, dport: int, data: bytes | bytearray,
                  now: float) -> None:
        """One datagram as drained from a real socket: one frame, or its fragments."""
        stat = self.stat
        n = len(data)
        size = n + IP_HDR + UDP_HDR
        if size <= self.mtu:
            stat.frames += 1
            stat.bytes += size
            if not self.ring_ok:
                stat.rx_nomem += 1
                stat.rx_missed += 1
                self._udp_sk_drop(dport, "rx_nomem")
                return
            skb = self.mem.rx_skb(size)  # step 1
            if skb is None:
                stat.rx_nomem += 1
                self.ring_ok = False
                self._udp_sk_drop(dport, "rx_nomem")
                return
            skb.data = data
            skb.len = n
            skb.saddr = saddr
            skb.sport = sport
            if skb.memalloc:  # step 2
                with memalloc_noreclaim():
                    self._udp_rcv(skb, saddr, daddr, dport, now)
                return
            # step 3, the route cache hit inlined (the flood's hot path)
            rt = self.rtable.get((saddr, daddr))
            if rt is not None:
                stat.route_lookups += 1
                stat.route_hits += 1
                rt.lastuse = now
                # steps 5-8 for an ordinary skb, inlined likewise
                sk = self.udp_table.get(dport)
                if sk is not None and sk.sk_rmem_alloc + skb.truesize < sk.sk_rcvbuf:
                    sk.queue_rcv_skb(skb)
                    stat.delivered += 1
                else:
                    self._udp_deliver(skb, dport)
            else:
                self._udp_rcv(skb, saddr, daddr, dport, now)
            return
        self.ip_id = ip_id = (self.ip_id + 1) & 0xFFFF
        key = (saddr, daddr, ip_id, IPPROTO_UDP)
        for off, length, more in ip_fragments(n + UDP_HDR, self.mtu):
            size = length + IP_HDR
            stat.frames += 1
            stat.bytes += size
            stat.frags += 1
            if not self.ring_ok:
                stat.rx_nomem += 1
                stat.rx_missed += 1
                self._udp_sk_drop(dport, "rx_nomem")
                continue
            skb = self.mem.rx_skb(size)
            if skb is None:
                stat.rx_nomem += 1
                self.ring_ok = False
                self._udp_sk_drop(dport, "rx_nomem")
                continue
            skb.saddr = saddr
            skb.sport = sport
            if skb.memalloc:
                with memalloc_noreclaim():
                    self._udp_frag_rcv(skb, key, off, length, more, data if off == 0 else None, dport, now)
            else:
                self._udp_frag_rcv(skb, key, off, length, more, data if off == 0 else None, dport, now)

    def _udp_sk_drop(self, dport: int, reason: str) -> None:
        """Attribute a drop before demux to the socket the frame was for (diagnostics only: the
        kernel cannot know it, the emulator's wire does)."""
        sk = self.udp_table.get(dport)
        if sk is not None:
            d = sk.rx_drops
            d[reason] = d.get(reason, 0) + 1

    def _udp_rcv(self, skb: SkBuff, saddr: str, daddr: str, dport: int, now: float) -> None:
        if self.routes.input(saddr, daddr, now) is None:  # step 3
            self.stat.route_nomem += 1
            self._udp_sk_drop(dport, "route_nomem")
            skb.free()
            return
        self._udp_deliver(skb, dport)

    def _udp_frag_rcv(self, skb: SkBuff, key: tuple[str, str, int, int], off: int, length: int,
                      more: bool, payload: bytes | bytearray | None, dport: int, now: float) -> None:
        rt = self.rtable.get((key[0], key[1]))  # step 3 (hit inlined)
        if rt is not None:
            self.stat.route_lookups += 1
            self.stat.route_hits += 1
            rt.lastuse = now
        elif self.routes.input(key[0], key[1], now) is None:
            self.stat.route_nomem += 1
            self._udp_sk_drop(dport, "route_nomem")
            skb.free()
            return
        nomem = self.stat.frag_nomem
        whole = self.frags.queue_fragment(skb, key, off, length, more, payload, now)  # step 4
        if whole is None:
            if self.stat.frag_nomem != nomem:
                self._udp_sk_drop(dport, "frag_nomem")
            return
        if whole.memalloc and not skb.memalloc:
            with memalloc_noreclaim():
                self._udp_deliver(whole, dport)
        else:
            self._udp_deliver(whole, dport)

    def _udp_deliver(self, skb: SkBuff, dport: int) -> None:
        stat = self.stat
        sk = self.udp_table.get(dport)  # step 5
        if sk is None:
            stat.no_socket += 1
            skb.free()
            return
        if skb.memalloc and not sk.memalloc:  # step 6
            stat.pfmemalloc_drop += 1
            sk.drop("pfmemalloc_drop")
            skb.free()
            return
        if sk.sk_rmem_alloc + skb.truesize >= sk.sk_rcvbuf:  # step 7 (2.6.22 sock_queue_rcv_skb)
            if not (skb.memalloc and sk.memalloc):
                stat.rcvbuf_full += 1
                sk.drop("rcvbuf_full")
                skb.free()
                return
            stat.rcvbuf_bypass += 1
        sk.queue_rcv_skb(skb)  # step 8
        stat.delivered += 1
        if skb.memalloc:
            stat.delivered_emergency += 1

    # ---- TCP ----------------------------------------------------------------------------------

    def tcp_input(self, sk: Sock, chunk: bytes, now: float) -> bool:
        """One MSS chunk of a connection; False means dropped (the wire holds it)."""
        stat = self.stat
        size = len(chunk) + IP_HDR + TCP_HDR
        stat.frames += 1
        stat.bytes += size
        if not self.ring_ok:
            stat.rx_nomem += 1
            stat.rx_missed += 1
            sk.drop("rx_nomem", pre_demux=True)
            return False
        skb = self.mem.rx_skb(size)  # step 1
        if skb is None:
            stat.rx_nomem += 1
            self.ring_ok = False
            sk.drop("rx_nomem", pre_demux=True)
            return False
        skb.data = chunk
        skb.len = len(chunk)
        skb.saddr = sk.raddr
        skb.sport = sk.rport
        if skb.memalloc:  # step 2
            with memalloc_noreclaim():
                return self._tcp_rcv(skb, sk, now)
        return self._tcp_rcv(skb, sk, now)

    def _tcp_rcv(self, skb: SkBuff, sk: Sock, now: float) -> bool:
        stat = self.stat
        if self.routes.input(sk.raddr, sk.laddr, now) is None:  # step 3
            stat.route_nomem += 1
            sk.drop("route_nomem", pre_demux=True)
            skb.free()
            return False
        if self.tcp_table.get((sk.lport, sk.raddr, sk.rport)) is not sk:  # step 5
            stat.no_socket += 1
            skb.free()
            return False
        if skb.memalloc and not sk.memalloc:  # step 6
            stat.pfmemalloc_drop += 1
            sk.drop("pfmemalloc_drop")
            skb.free()
            return False
        if sk.sk_rmem_alloc + skb.truesize >= sk.sk_rcvbuf:  # step 7
            if not (skb.memalloc and sk.memalloc):
                stat.rcvbuf_full += 1
                sk.drop("rcvbuf_full")
                skb.free()
                return False
            stat.rcvbuf_bypass += 1
        sk.queue_rcv_skb(skb)  # step 8
        stat.delivered += 1
        if skb.memalloc:
            stat.delivered_emergency += 1
        return True
