"""The NFS server's trio driver: sockets in, `RpcService.dispatch` in the middle, sockets out.

Every service port (NFS, MOUNT, optional portmap) is served on both UDP and TCP, and every port
answers every program (as knfsd's and ganesha's ports do for NULL probes). One task per TCP
connection reads records (each capped by `max_record`; a bigger one closes that connection only)
and runs each call in its own task, at most `max_inflight` calls and `inflight_bytes` of
arguments at once; past that it stops reading, so TCP flow control holds the client back.
Replies go out with `sendmsg` scatter-gather, READ data with sendfile(2), so it is never copied
into a bigger message.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket as pysocket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from nfs.drc import DuplicateRequestCache
from nfs.mount import MOUNT_PROGRAM, MOUNT_V3, MountProgram
from nfs.nfs3 import NFS_PROGRAM, NFS_V3
from nfs.nfsd import NfsProgram
from nfs.portmap import IPPROTO_TCP, IPPROTO_UDP, Mapping, PortmapProgram
from nfs.record import DEFAULT_MAX_RECORD, BufferPool, RecordDecoder, RecordTooLarge, record_mark
from nfs.store import Export, default_state_dir, load_key
from nfs.svc import Buffer, CallContext, FileSegment, RpcService, close_segments, materialize

log = logging.getLogger("netswap.nfs.server")

UDP_MAX_PAYLOAD = 65507
_BIG_RECV = 64 * 1024
_MAX_LOWAT = 256 * 1024


@dataclass
class ServerConfig:
    export: Path
    bind: str = "127.0.0.1"
    port: int = 2049
    mount_port: int = 20048
    portmap_port: int | None = None  # None: no portmap service
    allow: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(
        default_factory=lambda: [ipaddress.ip_network("127.0.0.0/8")])
    state_dir: Path | None = None
    names: Sequence[str] = ()  # extra export names (aliases) clients may mount
    max_record: int = DEFAULT_MAX_RECORD
    max_connections: int = 256
    max_io: int = 1024 * 1024
    max_inflight: int = 16  # calls executed at once per TCP connection (x4 per UDP socket)
    inflight_bytes: int = 8 * 1024 * 1024  # and the bytes of their arguments


@dataclass
class ServerStats:
    tcp_connections: int = 0
    tcp_refused: int = 0
    oversized_records: int = 0
    udp_datagrams: int = 0
    udp_send_errors: int = 0


async def send_iov(sock: trio.socket.SocketType, bufs: Sequence[Buffer], addr: object = None) -> None:
    """Send every buffer, in order: one datagram to `addr`, or onto a stream socket, handling
    partial sends; file segments go by sendfile(2)."""
    try:
        if addr is not None:
            await sock.sendmsg([memoryview(b).cast("B") for b in materialize(list(bufs)) if len(b)], [], 0, addr)
            return
        views: list[memoryview] = []
        for b in bufs:
            if isinstance(b, FileSegment):
                await _send_views(sock, views, more=True)
                views = []
                await _sendfile(sock, b)
            elif len(b):
                views.append(memoryview(b).cast("B"))
        await _send_views(sock, views)
    finally:
        close_segments(list(bufs))


async def _send_views(sock: trio.socket.SocketType, views: list[memoryview], more: bool = False) -> None:
    flags = pysocket.MSG_MORE if more else 0
    while views:
        n = await sock.sendmsg(views, [], flags)
        while n:
            first = len(views[0])
            if n >= first:
                n -= first
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


async def _sendfile(sock: trio.socket.SocketType, seg: FileSegment) -> None:
    offset, left = seg.offset, seg.count
    while left:
        try:
            n = os.sendfile(sock.fileno(), seg.fd, offset, left)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        if n == 0:  # the file shrank under us: keep the record intact with zeros
            await _send_views(sock, [memoryview(bytes(left))])
            return
        offset += n
        left -= n
        await trio.lowlevel.checkpoint_if_cancelled()


class NfsServer:
    """MOUNT v3 + NFSv3 (+ portmap v2) for one exported directory."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        key = load_key(config.state_dir or default_state_dir())
        self.export = Export(config.export, key)
        names = [self.export.root, *config.names]
        self.pool = BufferPool(8)  # record buffers, shared by the connections
        self.nfs = NfsProgram(self.export, config.allow, max_io=config.max_io)
        self.mount = MountProgram(self.export, names, config.allow)
        self.portmap = PortmapProgram() if config.portmap_port is not None else None
        programs: list = [self.nfs, self.mount]
        if self.portmap is not None:
            programs.append(self.portmap)
        self.svc = RpcService(programs, DuplicateRequestCache())
        self.stats = ServerStats()
        self.ports: dict[str, int] = {}
        self._conns = 0

    @property
    def verifier(self) -> bytes:
        return self.nfs.verifier

    async def _bind_pair(self, port: int) -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
        """A TCP listener and a UDP socket on the same port number (port 0: pick a free one)."""
        family = pysocket.AF_INET6 if ":" in self.config.bind else pysocket.AF_INET
        for _ in range(50):
            tcp = trio.socket.socket(family, pysocket.SOCK_STREAM)
            tcp.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_REUSEADDR, 1)
            udp = trio.socket.socket(family, pysocket.SOCK_DGRAM)
            try:
                await tcp.bind((self.config.bind, port))
                actual = tcp.getsockname()[1]
                await udp.bind((self.config.bind, actual))
            except OSError as e:
                tcp.close()
                udp.close()
                if port == 0 and e.errno == errno.EADDRINUSE:
                    continue
                raise
            tcp.listen(128)
            udp.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_RCVBUF, 4 * 1024 * 1024)
            return tcp, udp
        raise OSError(errno.EADDRINUSE, "no free port for both TCP and UDP")

    async def serve(self, *, task_status: trio.TaskStatus[dict[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        wanted = [("nfs", cfg.port), ("mount", cfg.mount_port)]
        if cfg.portmap_port is not None:
            wanted.append(("portmap", cfg.portmap_port))
        socks: list[tuple[str, trio.socket.SocketType, trio.socket.SocketType]] = []
        try:
            for name, port in wanted:
                tcp, udp = await self._bind_pair(port)
                socks.append((name, tcp, udp))
                self.ports[name] = tcp.getsockname()[1]
            if self.portmap is not None:
                for prog, vers, name in ((NFS_PROGRAM, NFS_V3, "nfs"), (MOUNT_PROGRAM, MOUNT_V3, "mount")):
                    for prot in (IPPROTO_TCP, IPPROTO_UDP):
                        self.portmap.set(Mapping(prog, vers, prot, self.ports[name]))
            async with trio.open_nursery() as nursery:
                for _, tcp, udp in socks:
                    nursery.start_soon(self._accept_loop, tcp, nursery)
                    nursery.start_soon(self._udp_loop, udp)
                task_status.started(dict(self.ports))
        finally:
            for _, tcp, udp in socks:
                tcp.close()
                udp.close()
            self.export.close()

    async def _accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            try:
                sock, peer = await listener.accept()
            except OSError as e:  # EMFILE and friends: back off, keep serving
                log.warning("accept: %s", e)
                await trio.sleep(0.05)
                continue
            if self._conns >= self.config.max_connections:
                self.stats.tcp_refused += 1
                sock.close()
                continue
            self._conns += 1
            self.stats.tcp_connections += 1
            nursery.start_soon(self._tcp_conn, sock, peer)

    async def _tcp_conn(self, sock: trio.socket.SocketType, peer: tuple) -> None:
        sock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)
        dec = RecordDecoder(self.config.max_record, self.pool)
        scratch = bytearray(_BIG_RECV)
        scratch_mv = memoryview(scratch)
        host, port = str(peer[0]), int(peer[1])
        budget = InflightBudget(self.config.max_inflight, self.config.inflight_bytes)
        send_lock = trio.StrictFIFOLock()
        lowat = 1
        try:
            async with trio.open_nursery() as calls:
                try:
                    while True:
                        rec = dec.next_record()
                        if rec is not None:
                            # Calls of one connection run concurrently (a FILE_SYNC write's fsync
                            # does not hold up the next READ), within the connection's budget.
                            await budget.acquire(len(rec))
                            calls.start_soon(self._tcp_call, sock, send_lock, dec, rec, host, port, budget)
                            continue
                        buf = dec.get_buffer()
                        if buf is not None and len(buf) >= _BIG_RECV:
                            # Inside a big fragment: receive straight into the record, and let the
                            # kernel wake us only once a good part of it is there (SO_RCVLOWAT).
                            want = min(len(buf), _MAX_LOWAT)
                            if want != lowat:
                                sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_RCVLOWAT, want)
                                lowat = want
                            n = await sock.recv_into(buf)
                            buf.release()
                            if n == 0:
                                return
                            dec.commit(n)
                        else:
                            if buf is not None:
                                buf.release()
                            if lowat != 1:
                                sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_RCVLOWAT, 1)
                                lowat = 1
                            n = await sock.recv_into(scratch)
                            if n == 0:
                                return  # the calls in flight still get their replies
                            dec.feed(scratch_mv[:n])
                except RecordTooLarge as e:
                    self.stats.oversized_records += 1
                    log.warning("%s:%d: %s; closing the connection", host, port, e)
                    calls.cancel_scope.cancel()
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    log.debug("%s:%d: connection ended: %s", host, port, e)
        except Exception:  # a bug must cost this connection, never the server
            log.exception("%s:%d: connection failed", host, port)
        finally:
            self._conns -= 1
            sock.close()

    async def _tcp_call(self, sock: trio.socket.SocketType, send_lock: trio.StrictFIFOLock, dec: RecordDecoder,
                        rec: memoryview, host: str, port: int, budget: InflightBudget) -> None:
        n = len(rec)
        reply: list[Buffer] | None = None
        try:
            reply = await self.svc.dispatch(rec, CallContext(host, port, "tcp"))
            dec.recycle(rec)  # nothing refers to the call any more: reuse its buffer
            if reply is not None:
                total = sum(len(b) for b in reply)
                async with send_lock:
                    await send_iov(sock, [record_mark(total), *reply])
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.debug("%s:%d: reply not sent: %s", host, port, e)
        finally:
            if reply is not None:
                close_segments(reply)  # (already closed if it was sent)
            budget.release(n)

    async def _udp_loop(self, sock: trio.socket.SocketType) -> None:
        budget = InflightBudget(self.config.max_inflight * 4, self.config.inflight_bytes)
        async with trio.open_nursery() as calls:
            while True:
                try:
                    data, addr = await sock.recvfrom(UDP_MAX_PAYLOAD + 1)
                except OSError as e:  # e.g. ECONNREFUSED from an earlier ICMP error
                    log.debug("udp recvfrom: %s", e)
                    continue
                self.stats.udp_datagrams += 1
                await budget.acquire(len(data))
                calls.start_soon(self._udp_call, sock, data, addr, budget)

    async def _udp_call(self, sock: trio.socket.SocketType, data: bytes, addr: tuple, budget: InflightBudget) -> None:
        try:
            ctx = CallContext(str(addr[0]), int(addr[1]), "udp", max_reply=UDP_MAX_PAYLOAD)
            reply = await self.svc.dispatch(data, ctx)
            if reply is not None:
                try:
                    await send_iov(sock, reply, addr)
                except OSError as e:
                    self.stats.udp_send_errors += 1
                    log.debug("udp sendmsg to %s: %s", addr, e)
        except Exception:  # a bug must cost this call, never the server
            log.exception("udp call from %s failed", addr)
        finally:
            budget.release(len(data))


class InflightBudget:
    """Bounds the calls being executed (and the bytes of their arguments) for one connection or
    UDP socket; the reader waits here, so TCP backpressure reaches the client."""

    def __init__(self, max_calls: int, max_bytes: int) -> None:
        self.max_calls = max_calls
        self.max_bytes = max_bytes
        self.calls = 0
        self.bytes = 0
        self._changed = trio.Event()

    async def acquire(self, n: int) -> None:
        # One call always fits (its size is already capped by max_record).
        while self.calls >= self.max_calls or (self.calls and self.bytes + n > self.max_bytes):
            await self._changed.wait()
        self.calls += 1
        self.bytes += n

    def release(self, n: int) -> None:
        self.calls -= 1
        self.bytes -= n
        self._changed.set()
        self._changed = trio.Event()


def parse_allow(values: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(v, strict=False) for v in values]


__all__ = ["NfsServer", "ServerConfig", "parse_allow", "send_iov"]
