"""NetStack: the network stack of one emulated host.

It owns the emulated sockets (each backed by one real loopback socket) and their hash tables, the
route cache, the fragment queues, the skb allocator, the counters, the NIC and its receive path,
and under v12 the network part of the reserve tree; all of it is charged to the host's memory
(`zone`, `slabs`) and its CPU (`cpu`, whose clock is the host's emulated clock).  Typical use:

    net = NetStack(zone, slabs, reserve=root, cpu=cpu)
    async with trio.open_nursery() as n:
        await n.start(net.run)                # the wires (ksoftirqd/0) and the IP timers
        stream = await net.connect_tcp("127.0.0.1", 3260, memalloc=True)   # EmuStream
        dgram = await net.open_udp("127.0.0.1", 2049, memalloc=True)       # EmuDatagram
        app = await net.open_app_udp(0, owner=process)                      # Sock
        print(net.ss(), net.nstat())
"""

from __future__ import annotations

import errno
import os
import socket as _socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from emu.kernel.cpu import Cpu
from emu.kernel.sched import TaskFlags, softirq, task
from emu.mm.gfp import GFP_ATOMIC, GFP_KERNEL
from emu.kernel.policy import Policy
from emu.mm.sizes import SOCK_TCP, SOCK_UDP
from emu.net.ipfrag import IPFRAG_HIGH_THRESH, IPFRAG_LOW_THRESH, IPFRAG_TIME, FragQueues
from emu.net.netstat import NetStat, ss, ss_rows
from emu.net.reserve import NetReserve
from emu.net.route import RouteCache, route_hash_defaults
from emu.net.rx import IP_HDR, MSS_DEFAULT, MTU_DEFAULT, TCP_HDR, UDP_HDR, RxPath, ip_fragments
from emu.net.skbuff import SKB_OVERHEAD, SkbAllocator
from emu.net.sock import RMEM_DEFAULT, Sock, app_reader
from emu.net.transport import EmuDatagram, EmuStream
from emu.net.nic import TCP_RTO_MAX, TCP_RTO_MIN, Nic
from emu.net.wire import GRACE_TRAFFIC, REAL_RCVBUF_DEFAULT, TcpWire, UdpWire, set_big_rcvbuf

if TYPE_CHECKING:
    from emu.mm.page_alloc import Zone
    from emu.mm.reserve import ReserveRoot
    from emu.mm.slab import Slabs
    from emu.net.capture import PacketTap
    from emu.net.link import Framer, PeerLink

__all__ = ["NetStack", "TcpListener", "app_reader", "serve_app_tcp"]


class NetStack:
    def __init__(
        self,
        zone: Zone,
        slabs: Slabs,
        *,
        reserve: ReserveRoot | None = None,
        cpu: Cpu | None = None,
        mtu: int = MTU_DEFAULT,
        rmem_default: int = RMEM_DEFAULT,
        ip_rt_max_size: int | None = None,
        ip_rt_gc_thresh: int | None = None,
        ip_rt_gc_min_interval: float = 0.5,
        ip_rt_gc_timeout: float = 300.0,
        ip_rt_gc_interval: float = 60.0,
        ipfrag_high_thresh: int = IPFRAG_HIGH_THRESH,
        ipfrag_low_thresh: int | None = None,
        ipfrag_time: float = IPFRAG_TIME,
        tcp_rto_min: float = TCP_RTO_MIN,
        tcp_rto_max: float = TCP_RTO_MAX,
        batch: int = 64,
        local_addr: str = "127.0.0.1",
        real_rcvbuf: int = REAL_RCVBUF_DEFAULT,
    ) -> None:
        self.zone = zone
        self.slabs = slabs
        self.policy = zone.policy
        self.cpu = cpu if cpu is not None else Cpu()
        self.costs = self.cpu.costs
        self.clock = self.cpu.clock
        ram = zone.nr_pages * zone.page_size
        rh = route_hash_defaults(ram, zone.page_size)
        if ip_rt_max_size is None:
            ip_rt_max_size = rh.max_size
        if ip_rt_gc_thresh is None:
            ip_rt_gc_thresh = min(rh.gc_thresh, ip_rt_max_size)
        if ipfrag_low_thresh is None:
            ipfrag_low_thresh = min(IPFRAG_LOW_THRESH, ipfrag_high_thresh * 3 // 4)
        if rmem_default < 1:
            raise ValueError("rmem_default must be positive")
        # v12: the network's reserve nodes, sized for exactly what the stack may use
        self.reserve: NetReserve | None = None
        if self.policy is Policy.V12:
            if reserve is None:
                raise ValueError("policy v12 needs the host's reserve root")
            self.reserve = NetReserve(reserve, route_max_size=ip_rt_max_size, ipfrag_high_thresh=ipfrag_high_thresh)
        self.rmem_default = rmem_default
        self.local_addr = local_addr
        self.real_rcvbuf = real_rcvbuf
        self.ipfrag_time = ipfrag_time
        self.ip_rt_gc_interval = ip_rt_gc_interval
        self.stat = NetStat()
        nr = self.reserve
        self.skbs = SkbAllocator(slabs, self.policy, nr.skb_data if nr else None)
        self.routes = RouteCache(slabs, self.stat, ip_rt_gc_thresh, ip_rt_max_size, ip_rt_gc_min_interval,
                                 ip_rt_gc_timeout, reserve=nr.route_cache if nr else None)
        self.frags = FragQueues(self.skbs, self.stat, ipfrag_high_thresh, ipfrag_low_thresh, ipfrag_time,
                                reserve=nr.frag_cache if nr else None)
        self.udp_table: dict[int, Sock] = {}
        self.tcp_table: dict[tuple[int, str, int], Sock] = {}
        self.rx = RxPath(self.skbs, self.routes, self.frags, self.udp_table, self.tcp_table, self.stat,
                         self.cpu, mtu=mtu)
        self.mtu = mtu
        self.mss = mtu - IP_HDR - TCP_HDR if mtu != MTU_DEFAULT else MSS_DEFAULT
        self.nic = Nic(self.rx, self.stat, self.clock, batch=batch, rx_usecs=self.costs.rx_usecs, mss=self.mss,
                       tcp_rto_min=tcp_rto_min, tcp_rto_max=tcp_rto_max)
        self.tcp_chunk_truesize = self.mss + IP_HDR + TCP_HDR + SKB_OVERHEAD
        self.socks: list[Sock] = []
        self.tap: PacketTap | None = None  # --pcap (emu.net.capture): an observer, None unless capturing
        self.closed_ports: dict[int, UdpWire] = {}
        self.listeners: list[TcpListener] = []
        self.udp_sk_cache = slabs.cache("UDP", SOCK_UDP)
        self.tcp_sk_cache = slabs.cache("TCP", SOCK_TCP)

    def set_tap(self, tap: PacketTap | None) -> None:
        """Capture every frame from now on (`--pcap`), or stop (None)."""
        self.tap = tap
        self.rx.tap = tap
        self.rx.trace = [] if tap is not None else None

    # ---- running --------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The wires (as ksoftirqd/0) and the IP timers, until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.nic.run)
                nursery.start_soon(self._ip_timers)
                task_status.started()
        finally:
            self.close_all()

    async def _ip_timers(self) -> None:
        """ip_expire (checked ipfrag_time/4 at most apart) and rt_check_expire (every
        ip_rt_gc_interval): timers run in softirq."""
        interval = min(0.1, self.ipfrag_time / 4)
        with task("ksoftirqd/0:timers", TaskFlags.PF_KTHREAD):
            next_rt = trio.current_time() + self.ip_rt_gc_interval
            while True:
                await trio.sleep(interval if self.frags.queues else self.ipfrag_time / 4)
                with softirq():
                    now = trio.current_time()
                    if self.frags.queues:
                        self.frags.expire(now)
                    if now >= next_rt:
                        self.routes.expire(now)
                        next_rt = now + self.ip_rt_gc_interval

    # ---- sockets --------------------------------------------------------------------------------

    async def connect_tcp(self, host: str, port: int, *, memalloc: bool = False, owner: Any = None,
                          rcvbuf: int | None = None, link: PeerLink | None = None,
                          framer: Framer | None = None) -> EmuStream:
        """A TCP connection (e.g. the iSCSI session); `memalloc` marks it SOCK_MEMALLOC.  With a
        `link`, the handshake takes the link's round trip, whatever the real connect took."""
        raw = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        t0 = trio.current_time()
        try:
            raw.setblocking(False)
            raw.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            raw.bind((self.local_addr, 0))  # the host's own address: hosts sharing a server are told apart
            tsock = trio.socket.from_stdlib_socket(raw)
            try:
                if self.clock is not None:
                    with self.clock.real_io():
                        await tsock.connect((host, port))
                else:
                    await tsock.connect((host, port))
            except OSError as exc:
                if self.clock is not None and link is not None and exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET):
                    link.mark_down(self.clock.now)
                    self.clock.peer_down(link.name)
                raise
            if link is not None:
                if self.clock is not None:
                    link.mark_up(self.clock.current_time())
                    self.clock.peer_up(link.name)
                await trio.sleep_until(t0 + link.rtt)
            sk_obj = await self.tcp_sk_cache.alloc_wait(GFP_KERNEL)  # sk_alloc
        except BaseException:
            raw.close()
            raise
        sk = self._adopt_tcp(raw, owner, rcvbuf, sk_obj, link=link, framer=framer)
        if memalloc:
            _set_memalloc(sk)
        return EmuStream(sk)

    async def open_app_tcp_listener(self, port: int = 0, owner: Any = None, *, rcvbuf: int | None = None,
                                    addr: str | None = None, backlog: int = 128) -> TcpListener:
        """An application's listening TCP socket; `accept()` (or `serve_app_tcp`) yields emulated
        TCP sockets owned by `owner`, so background TCP streams are charged like UDP floods."""
        raw = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        try:
            raw.setblocking(False)
            raw.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
            raw.bind((addr or self.local_addr, port))
            raw.listen(backlog)
        except BaseException:
            raw.close()
            raise
        lst = TcpListener(self, raw, owner, rcvbuf)
        self.listeners.append(lst)
        return lst

    def _adopt_tcp(self, raw: _socket.socket, owner: Any, rcvbuf: int | None, sk_obj: Any, *,
                   link: PeerLink | None = None, framer: Framer | None = None) -> Sock:
        sk = Sock(self, "tcp", raw, owner, rcvbuf if rcvbuf is not None else self.rmem_default)
        sk.sk_obj = sk_obj
        self.socks.append(sk)
        self.tcp_table[(sk.lport, sk.raddr, sk.rport)] = sk
        sk.wire = TcpWire(self.nic, sk, raw, link=link, framer=framer)
        self.nic.attach(sk.wire)
        return sk

    async def open_udp(self, host: str, port: int, *, memalloc: bool = False, owner: Any = None,
                       rcvbuf: int | None = None, link: PeerLink | None = None,
                       framer: Framer | None = None) -> EmuDatagram:
        """A connected UDP socket (e.g. the NFS/UDP transport); `memalloc` marks it SOCK_MEMALLOC."""
        raw = self._udp_raw((self.local_addr, 0))
        try:
            await trio.socket.from_stdlib_socket(raw).connect((host, port))
            sk = await self._new_sock("udp", raw, owner, rcvbuf)
        except BaseException:
            raw.close()
            raise
        self._hash_udp(sk, link=link, framer=framer)
        if memalloc:
            _set_memalloc(sk)
        return EmuDatagram(sk)

    def reserve_udp_port(self, port: int = 0, addr: str | None = None) -> _socket.socket:
        """A real UDP socket bound now, for `open_app_udp(reserved=...)` later: the port stays
        this host's meanwhile, however many other runs share the machine.  Nothing may be sent
        to it before then (HostTraffic sends only to ports with a wire)."""
        return self._udp_raw((addr or self.local_addr, port))

    async def open_app_udp(self, port: int = 0, owner: Any = None, *, rcvbuf: int | None = None,
                           addr: str | None = None, reserved: _socket.socket | None = None) -> Sock:
        """An application's UDP socket bound to `port` (0: any) on the host's address, or on the
        `reserved` socket's port.  The wire is attached only once the emulated socket exists
        (sk_alloc may sleep in reclaim): from then on, every datagram it receives is one its wire
        knows about."""
        try:
            sk_obj = await self.udp_sk_cache.alloc_wait(GFP_KERNEL)  # sk_alloc
        except BaseException:
            if reserved is not None:
                reserved.close()
            raise
        try:
            if reserved is not None:
                raw = reserved
                _drain(raw)
            else:
                raw = self._udp_raw((addr or self.local_addr, port))
        except BaseException:
            self.udp_sk_cache.free(sk_obj)
            if reserved is not None:
                reserved.close()
            raise
        sk = Sock(self, "udp", raw, owner, rcvbuf if rcvbuf is not None else self.rmem_default)
        sk.sk_obj = sk_obj
        self.socks.append(sk)
        self._hash_udp(sk, grace=GRACE_TRAFFIC)
        return sk

    def open_closed_port(self, port: int = 0, addr: str | None = None) -> int:
        """Receive on a UDP port the host has no socket for: frames go through steps 1-4 and are
        dropped at demux (NO_SOCKET), as a flood at a closed port costs a real host.  Returns the port."""
        raw = self._udp_raw((addr or self.local_addr, port))
        wire = UdpWire(self.nic, None, raw, grace=GRACE_TRAFFIC)
        self.closed_ports[wire.lport] = wire
        self.nic.attach(wire)
        return wire.lport

    def udp_wire(self, port: int) -> UdpWire | None:
        """The wire that receives on a local UDP port (a socket's, or a closed port's)."""
        sk = self.udp_table.get(port)
        if sk is not None:
            return sk.wire  # type: ignore[return-value]
        return self.closed_ports.get(port)

    async def _new_sock(self, proto: str, raw: _socket.socket, owner: Any, rcvbuf: int | None) -> Sock:
        cache = self.udp_sk_cache if proto == "udp" else self.tcp_sk_cache
        sk_obj = await cache.alloc_wait(GFP_KERNEL)  # sk_alloc
        sk = Sock(self, proto, raw, owner, rcvbuf if rcvbuf is not None else self.rmem_default)
        sk.sk_obj = sk_obj
        self.socks.append(sk)
        return sk

    def _udp_raw(self, bind: tuple[str, int]) -> _socket.socket:
        raw = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
        try:
            raw.setblocking(False)
            set_big_rcvbuf(raw, self.real_rcvbuf)
            raw.bind(bind)
        except BaseException:
            raw.close()
            raise
        return raw

    def _hash_udp(self, sk: Sock, **wire_kw: Any) -> None:
        if sk.lport in self.udp_table:
            raise OSError(f"UDP port {sk.lport} already has an emulated socket")
        self.udp_table[sk.lport] = sk
        sk.wire = UdpWire(self.nic, sk, sk.raw, **wire_kw)
        self.nic.attach(sk.wire)

    def unhash(self, sk: Sock) -> None:
        """Called by Sock.close(): stop its wire, forget it, free its struct sock, close the real one."""
        if sk.proto == "udp":
            if self.udp_table.get(sk.lport) is sk:
                del self.udp_table[sk.lport]
        else:
            self.tcp_table.pop((sk.lport, sk.raddr, sk.rport), None)
        if sk.wire is not None:
            sk.wire.stop()
        if sk in self.socks:
            self.socks.remove(sk)
        if sk.sk_obj is not None:
            sk.sk_obj.cache.free(sk.sk_obj)
            sk.sk_obj = None
        sk.tsock.close()

    def close_all(self) -> None:
        for sk in list(self.socks):
            sk.close()
        for wire in self.closed_ports.values():
            wire.stop()
            trio.socket.from_stdlib_socket(wire.raw).close()
        self.closed_ports.clear()
        for lst in list(self.listeners):
            lst.close()

    # ---- transmit -------------------------------------------------------------------------------

    def tx_frame_sizes(self, proto: str, nbytes: int) -> list[int]:
        """The TX skbs one send of `nbytes` needs: IP fragments (UDP) or MSS segments (TCP)."""
        if proto == "udp":
            return [n + IP_HDR for _, n, _ in ip_fragments(nbytes + UDP_HDR, self.mtu)]
        mss = self.mss
        return [min(mss, nbytes - o) + IP_HDR + TCP_HDR for o in range(0, max(nbytes, 1), mss)]

    async def xmit(self, sk: Sock, data: bytes | bytearray | memoryview, addr: tuple[str, int] | None) -> None:
        """Hand the bytes to the real socket (dev_queue_xmit), and tell the wire what the peer
        will answer."""
        now = trio.current_time()
        raw = sk.raw
        try:
            if sk.proto == "udp":
                try:
                    raw.send(data) if addr is None else raw.sendto(data, addr)
                except BlockingIOError:
                    await self._send_blocked(sk, data, addr)
            else:
                view = memoryview(data)
                while view:
                    try:
                        n = raw.send(view)
                    except BlockingIOError:
                        await self._send_blocked(sk, view, None, partial=True)
                        continue
                    view = view[n:]
        except OSError as exc:
            wire = sk.wire
            if wire is not None and exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE):
                wire._peer_failed()
            raise
        wire = sk.wire
        if wire is not None and wire.link is not None:
            wire.sent(data, now)
        if self.tap is not None:
            self.tap.tx(sk, data, addr, now, self.mss)

    async def _send_blocked(self, sk: Sock, data: Any, addr: tuple[str, int] | None, partial: bool = False) -> None:
        """The real socket's send buffer is full: wait for it, a real operation the clock waits for."""
        clock = self.clock
        if clock is None:
            await sk.tsock.wait_writable()
            return
        with clock.real_io():
            await sk.tsock.wait_writable()

    # ---- SOCK_MEMALLOC bookkeeping ----------------------------------------------------------------

    def memalloc_socket_added(self) -> None:
        """sk_set_memalloc: sk_memalloc_socks++ (v12: the first hangs the network reserve)."""
        if self.reserve is not None:
            self.reserve.connect()  # raises ReserveError if it cannot fit: nothing changed
        self.skbs.memalloc_socks += 1

    def memalloc_socket_removed(self) -> None:
        self.skbs.memalloc_socks -= 1
        if self.reserve is not None:
            self.reserve.disconnect()

    @property
    def sk_memalloc_socks(self) -> int:
        return self.skbs.memalloc_socks

    # ---- views --------------------------------------------------------------------------------------

    def ss(self) -> str:
        return ss(self.socks)

    def ss_rows(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in ss_rows(self.socks)]

    def nstat(self, nonzero: bool = True) -> str:
        """The counters, then the gauges an engineer asks for next (route cache, fragment memory)."""
        gauges = [
            ("route_entries", len(self.routes), f"route cache entries now (ip_rt_max_size {self.routes.max_size})"),
            ("frag_queues", len(self.frags), "fragment reassembly queues now"),
            ("ip_frag_mem", self.frags.ip_frag_mem, f"bytes in them (high {self.frags.high_thresh})"),
            ("skbs_live", self.skbs.live, "skbs allocated now (RX queued, in reassembly, TX in flight)"),
            ("sk_memalloc_socks", self.skbs.memalloc_socks, "SOCK_MEMALLOC sockets"),
        ]
        lines = [f"{name:<44} {value:>12}    # {what}" for name, value, what in gauges]
        return self.stat.nstat(nonzero) + "\n".join(lines) + "\n"

    def memory(self) -> dict[str, int]:
        """Who holds network memory (the deadlock report's 'skbs queued per socket' part)."""
        return {
            "skbs_live": self.skbs.live,
            "skb_truesize_live": self.skbs.live_truesize,
            "socket_queued_skbs": sum(len(s.receive_queue) for s in self.socks),
            "socket_rmem_alloc": sum(s.sk_rmem_alloc for s in self.socks),
            "socket_emergency_skbs": sum(s.rx_emergency_skbs() for s in self.socks),
            "route_entries": len(self.routes),
            "route_reserve_entries": self.routes.reserve_entries(),
            "frag_queues": len(self.frags),
            "frag_skbs": self.frags.queued_skbs(),
            "ip_frag_mem": self.frags.ip_frag_mem,
            "sk_memalloc_socks": self.skbs.memalloc_socks,
        }

    def wire_overruns(self) -> dict[str, int]:
        """Datagrams the *real* kernel dropped on our UDP sockets before a wire could read them
        (the `drops` column of /proc/net/udp), by local address.  Non-zero means the host saw
        less than was sent."""
        by_inode: dict[int, str] = {}
        for sk in self.socks:
            if sk.proto == "udp" and not sk.closed:
                by_inode[os.fstat(sk.raw.fileno()).st_ino] = sk.local_str()
        for port, wire in self.closed_ports.items():
            by_inode[os.fstat(wire.raw.fileno()).st_ino] = f"{wire.laddr}:{port}"
        out: dict[str, int] = {}
        try:
            with open("/proc/net/udp") as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if len(cols) >= 13 and int(cols[9]) in by_inode:
                        out[by_inode[int(cols[9])]] = int(cols[12])
        except OSError:
            pass  # not Linux: nothing to say
        return out


class TcpListener:
    """A listening socket of an application on the emulated host.

    The real kernel completes the handshake; `accept()` then allocates the emulated `struct
    tcp_sock` as the kernel does for a new child socket (GFP_ATOMIC, softirq).  Without memory the
    connection is reset and counted (`listen_drops`)."""

    def __init__(self, net: NetStack, raw: _socket.socket, owner: Any, rcvbuf: int | None) -> None:
        self.net = net
        self.raw = raw
        self.tsock = trio.socket.from_stdlib_socket(raw)
        self.owner = owner
        self.rcvbuf = rcvbuf
        self.laddr, self.port = raw.getsockname()[:2]
        self.closed = False

    async def accept(self) -> Sock:
        net = self.net
        while True:
            if self.closed:
                raise trio.ClosedResourceError("listener closed")
            await trio.lowlevel.wait_readable(self.raw)
            try:
                conn, _ = self.raw.accept()
            except BlockingIOError:
                continue
            conn.setblocking(False)
            with softirq():
                sk_obj = net.tcp_sk_cache.alloc(GFP_ATOMIC)
            if sk_obj is None:
                net.stat.listen_drops += 1
                conn.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()  # RST
                continue
            net.stat.tcp_accepted += 1
            return net._adopt_tcp(conn, self.owner, self.rcvbuf, sk_obj)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.tsock.close()
        if self in self.net.listeners:
            self.net.listeners.remove(self)


async def serve_app_tcp(listener: TcpListener, resident: Callable[[], Awaitable[None]] | None = None,
                        interval: float = 0.0) -> None:
    """An application's TCP server: accept every connection and read it with `app_reader`
    (reading only while the owner is resident); each socket is closed at end of stream."""

    async def one(sk: Sock) -> None:
        try:
            await app_reader(sk, resident, interval)
        finally:
            sk.close()

    async with trio.open_nursery() as nursery:
        while True:
            try:
                sk = await listener.accept()
            except trio.ClosedResourceError:
                return
            nursery.start_soon(one, sk)


def _drain(raw: _socket.socket) -> None:
    """Discard what a reserved socket received before it was opened (nothing is sent to it then,
    but a stray datagram must not be taken for one its wire expects)."""
    while True:
        try:
            raw.recv(65536)
        except (BlockingIOError, InterruptedError):
            return


def _set_memalloc(sk: Sock) -> None:
    """sk_set_memalloc on a new socket; if the reserve cannot take it, the socket is closed."""
    try:
        sk.sk_set_memalloc()
    except BaseException:
        sk.close()
        raise
