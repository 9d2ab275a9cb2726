"""NetStack: the network stack of one emulated host.

It owns the emulated sockets (each backed by one real loopback socket), the route cache, the
fragment queues, the counters and the NIC receive stage, and charges all of it to the host's
memory (`mm.zone`, `mm.slabs`, and under v12 `mm.reserve`).  Typical use:

    net = NetStack(mm)                       # policy from mm.zone.policy
    async with trio.open_nursery() as n:
        await n.start(net.run)               # wires + IP timers, as ksoftirqd/0
        stream = await net.connect_tcp("127.0.0.1", 3260, memalloc=True)   # EmuStream
        dgram = await net.open_udp("127.0.0.1", 2049, memalloc=True)       # EmuDatagram
        app = await net.open_app_udp(0, owner=process)                      # Sock
        n.start_soon(app_reader, app, net.resident(process, pages))
        print(net.ss(), net.nstat())
"""

from __future__ import annotations

import os
import socket as _socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from types import SimpleNamespace
from typing import Any

import trio

from emu.mm.gfp import GFP_ATOMIC, GFP_KERNEL, Policy
from emu.mm.sched import softirq
from emu.mm.reserve import IPFRAG_HIGH_THRESH, IPFRAG_LOW_THRESH, IPFRAG_TIME, route_hash_defaults
from emu.mm.sizes import SOCK_TCP, SOCK_UDP
from emu.net.ip import RouteCache
from emu.net.ipfrag import FragQueues
from emu.net.netmem import NetMem
from emu.net.netstat import NetStat, ss, ss_rows
from emu.net.rx import Nic
from emu.net.skbuff import SKB_OVERHEAD
from emu.net.sock import RMEM_DEFAULT, Sock, app_reader
from emu.net.transport import EmuDatagram, EmuStream
from emu.net.wire import IP_HDR, REAL_RCVBUF_DEFAULT, TCP_HDR, TCP_RTO_MAX, TCP_RTO_MIN, TcpWire, UdpWire, set_big_rcvbuf

__all__ = ["NetStack", "TcpListener", "app_reader", "serve_app_tcp"]


class NetStack:
    def __init__(
        self,
        mm: Any,
        policy: Policy | str | None = None,
        *,
        mtu: int = 1500,
        rmem_default: int = RMEM_DEFAULT,
        ip_rt_max_size: int | None = None,
        ip_rt_gc_thresh: int | None = None,
        ip_rt_gc_min_interval: float = 0.5,
        ip_rt_gc_timeout: float = 300.0,
        ip_rt_gc_interval: float = 60.0,
        ipfrag_high_thresh: int | None = None,
        ipfrag_low_thresh: int | None = None,
        ipfrag_time: float = IPFRAG_TIME,
        tcp_rto_min: float = TCP_RTO_MIN,
        tcp_rto_max: float = TCP_RTO_MAX,
        batch: int = 64,
        local_addr: str = "127.0.0.1",
        real_rcvbuf: int = REAL_RCVBUF_DEFAULT,
    ) -> None:
        zone = mm.zone
        self.mm = mm
        self.zone = zone
        self.slabs = mm.slabs
        self.policy = Policy(policy) if policy is not None else zone.policy
        if self.policy is not zone.policy:
            raise ValueError(f"net policy {self.policy} differs from the zone's {zone.policy}")
        self.reserve = getattr(mm, "reserve", None)
        if self.policy is Policy.V12 and self.reserve is None:
            raise ValueError("policy v12 needs the host's ReserveTree (mm.reserve)")
        ram = zone.nr_pages * zone.page_size
        rh = route_hash_defaults(ram, zone.page_size)
        if ip_rt_max_size is None:
            ip_rt_max_size = self.reserve.route_max_size if self.reserve is not None else rh.max_size
        if ip_rt_gc_thresh is None:
            ip_rt_gc_thresh = min(rh.gc_thresh, ip_rt_max_size)
        if ipfrag_high_thresh is None:
            ipfrag_high_thresh = self.reserve.ipfrag_high_thresh if self.reserve is not None else IPFRAG_HIGH_THRESH
        if ipfrag_low_thresh is None:
            ipfrag_low_thresh = min(IPFRAG_LOW_THRESH, ipfrag_high_thresh * 3 // 4)
        if rmem_default < 1:
            raise ValueError("rmem_default must be positive")
        self.rmem_default = rmem_default
        self.local_addr = local_addr
        self.real_rcvbuf = real_rcvbuf
        self.stat = NetStat()
        self.mem = NetMem(self.slabs, self.policy, self.stat, self.reserve)
        self.routes = RouteCache(self.mem, self.stat, ip_rt_gc_thresh, ip_rt_max_size,
                                 ip_rt_gc_min_interval, ip_rt_gc_timeout)
        self.frags = FragQueues(self.mem, self.stat, ipfrag_high_thresh, ipfrag_low_thresh, ipfrag_time)
        self.nic = Nic(self.mem, self.stat, self.routes, self.frags, mtu=mtu, batch=batch,
                       tcp_rto_min=tcp_rto_min, tcp_rto_max=tcp_rto_max,
                       timer_interval=min(0.1, ipfrag_time / 4), rt_gc_interval=ip_rt_gc_interval)
        self.mtu = mtu
        self.mss = self.nic.mss
        self.tcp_chunk_truesize = self.mss + IP_HDR + TCP_HDR + SKB_OVERHEAD
        self.socks: list[Sock] = []
        self.closed_ports: dict[int, UdpWire] = {}
        self.listeners: list[TcpListener] = []
        self.udp_sk_cache = self.slabs.cache("UDP", SOCK_UDP)
        self.tcp_sk_cache = self.slabs.cache("TCP", SOCK_TCP)

    @classmethod
    def from_parts(cls, zone: Any, slabs: Any, reserve: Any = None, **kw: Any) -> NetStack:
        """A stack over a zone and slabs without a full Mm (tests, benchmarks)."""
        return cls(SimpleNamespace(zone=zone, slabs=slabs, reserve=reserve), **kw)

    # ---- running --------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The receive stage: drains every socket's wire and runs the IP timers until cancelled."""
        try:
            await self.nic.run(task_status=task_status)
        finally:
            self.close_all()

    # ---- sockets --------------------------------------------------------------------------------

    async def _new_sock(self, proto: str, raw: _socket.socket, owner: Any, rcvbuf: int | None) -> Sock:
        cache = self.udp_sk_cache if proto == "udp" else self.tcp_sk_cache
        sk_obj = await cache.alloc_wait(GFP_KERNEL)  # sk_alloc
        sk = Sock(self, proto, raw, owner, rcvbuf if rcvbuf is not None else self.rmem_default)
        sk.sk_obj = sk_obj
        self.socks.append(sk)
        return sk

    async def connect_tcp(self, host: str, port: int, *, memalloc: bool = False, owner: Any = None,
                          rcvbuf: int | None = None) -> EmuStream:
        """A TCP connection (e.g. the iSCSI session); `memalloc` marks it SOCK_MEMALLOC."""
        raw = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        try:
            raw.setblocking(False)
            raw.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            tsock = trio.socket.from_stdlib_socket(raw)
            await tsock.connect((host, port))
            sk_obj = await self.tcp_sk_cache.alloc_wait(GFP_KERNEL)  # sk_alloc
        except BaseException:
            raw.close()
            raise
        sk = self._adopt_tcp(raw, owner, rcvbuf, sk_obj)
        if memalloc:
            try:
                sk.sk_set_memalloc()
            except BaseException:
                sk.close()
                raise
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

    def _adopt_tcp(self, raw: _socket.socket, owner: Any, rcvbuf: int | None, sk_obj: Any) -> Sock:
        sk = Sock(self, "tcp", raw, owner, rcvbuf if rcvbuf is not None else self.rmem_default)
        sk.sk_obj = sk_obj
        self.socks.append(sk)
        self.nic.tcp_table[(sk.lport, sk.raddr, sk.rport)] = sk
        sk.wire = TcpWire(self.nic, sk, raw)
        self.nic.attach(sk.wire)
        return sk

    async def open_udp(self, host: str, port: int, *, memalloc: bool = False, owner: Any = None,
                       rcvbuf: int | None = None) -> EmuDatagram:
        """A connected UDP socket (e.g. the NFS/UDP transport); `memalloc` marks it SOCK_MEMALLOC."""
        raw = self._udp_raw((self.local_addr, 0))
        try:
            await trio.socket.from_stdlib_socket(raw).connect((host, port))
            sk = await self._new_sock("udp", raw, owner, rcvbuf)
        except BaseException:
            raw.close()
            raise
        self._hash_udp(sk)
        if memalloc:
            try:
                sk.sk_set_memalloc()
            except BaseException:
                sk.close()
                raise
        return EmuDatagram(sk)

    async def open_app_udp(self, port: int = 0, owner: Any = None, *, rcvbuf: int | None = None,
                           addr: str | None = None) -> Sock:
        """An application's UDP socket bound to `port` (0: any) on the host's address."""
        raw = self._udp_raw((addr or self.local_addr, port))
        try:
            sk = await self._new_sock("udp", raw, owner, rcvbuf)
        except BaseException:
            raw.close()
            raise
        self._hash_udp(sk)
        return sk

    def open_closed_port(self, port: int = 0, addr: str | None = None) -> int:
        """Receive on a UDP port the host has no socket for: frames go through steps 1-4 and are
        dropped at demux (no_socket), as a flood at a closed port costs a real host.  Returns the port."""
        raw = self._udp_raw((addr or self.local_addr, port))
        wire = UdpWire(self.nic, None, raw)
        self.closed_ports[wire.lport] = wire
        self.nic.attach(wire)
        return wire.lport

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

    def _hash_udp(self, sk: Sock) -> None:
        if sk.lport in self.nic.udp_table:
            raise OSError(f"UDP port {sk.lport} already has an emulated socket")
        self.nic.udp_table[sk.lport] = sk
        sk.wire = UdpWire(self.nic, sk, sk.raw)
        self.nic.attach(sk.wire)

    def unhash(self, sk: Sock) -> None:
        """Called by Sock.close(): stop its wire, forget it, free its struct sock, close the real one."""
        nic = self.nic
        if sk.proto == "udp":
            if nic.udp_table.get(sk.lport) is sk:
                del nic.udp_table[sk.lport]
        else:
            nic.tcp_table.pop((sk.lport, sk.raddr, sk.rport), None)
        if sk.wire is not None:
            sk.wire.cancel_scope.cancel()
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
            wire.cancel_scope.cancel()
            trio.socket.from_stdlib_socket(wire.raw).close()
        self.closed_ports.clear()
        for lst in list(self.listeners):
            lst.close()

    # ---- SOCK_MEMALLOC bookkeeping ----------------------------------------------------------------

    def memalloc_socket_added(self, sk: Sock) -> None:
        """sk_set_memalloc: sk_memalloc_socks++ (v12: the first hangs the network reserve)."""
        if self.reserve is not None and self.policy is Policy.V12:
            self.reserve.connect_network()  # raises ReserveError if it cannot fit: nothing changed
        self.mem.memalloc_socks += 1

    def memalloc_socket_removed(self, sk: Sock) -> None:
        self.mem.memalloc_socks -= 1
        if self.reserve is not None and self.policy is Policy.V12:
            self.reserve.disconnect_network()

    @property
    def sk_memalloc_socks(self) -> int:
        return self.mem.memalloc_socks

    # ---- applications ------------------------------------------------------------------------------

    @staticmethod
    def resident(process: Any, pages: Iterable[int]) -> Callable[[], Awaitable[None]]:
        """A residency check for `app_reader`: touch the process's working set (faulting it back in
        from swap, which blocks while memory is short) before each read."""
        pages = list(pages)

        async def touch_working_set() -> None:
            for p in pages:
                await process.touch(p, write=False)

        return touch_working_set

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
            ("skbs_live", self.mem.skbs_live, "skbs allocated now (RX queued, in reassembly, TX in flight)"),
            ("sk_memalloc_socks", self.mem.memalloc_socks, "SOCK_MEMALLOC sockets"),
        ]
        lines = [f"{name:<44} {value:>12}    # {what}" for name, value, what in gauges]
        return self.stat.nstat(nonzero) + "\n".join(lines) + "\n"

    def memory(self) -> dict[str, int]:
        """Who holds network memory (the deadlock report's 'skbs queued per socket' part)."""
        return {
            "skbs_live": self.mem.skbs_live,
            "skb_truesize_live": self.mem.skb_truesize_live,
            "socket_queued_skbs": sum(len(s.receive_queue) for s in self.socks),
            "socket_rmem_alloc": sum(s.sk_rmem_alloc for s in self.socks),
            "socket_emergency_skbs": sum(s.rx_emergency_skbs() for s in self.socks),
            "route_entries": len(self.routes),
            "route_reserve_entries": self.routes.reserve_entries(),
            "frag_queues": len(self.frags),
            "frag_skbs": self.frags.queued_skbs(),
            "ip_frag_mem": self.frags.ip_frag_mem,
            "sk_memalloc_socks": self.mem.memalloc_socks,
        }

    def wire_overruns(self) -> dict[str, int]:
        """Datagrams the *real* kernel dropped on our UDP sockets before a wire could read them
        (the `drops` column of /proc/net/udp), by local address.  Non-zero means the host saw
        less than was sent: the emulated stage was too slow or the real buffer too small."""
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

    def dst_cache_objs(self) -> int:
        """Objects live in ip_dst_cache (every route cache entry is one)."""
        return self.mem.dst_cache.active_objs

    def snapshot(self) -> dict[str, Any]:
        return {"policy": str(self.policy), "counters": self.stat.snapshot(), "memory": self.memory(),
                "sockets": self.ss_rows(), "wire_overruns": self.wire_overruns()}


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
