"""The NFS server's trio driver: sockets in, `RpcService.dispatch` in the middle, sockets out.

Every service port (NFS, MOUNT, optional portmap) is served on both UDP and TCP, and every port
answers every program (as knfsd's and ganesha's ports do for NULL probes). Each TCP connection has
a service thread (`_tcp_thread`, knfsd's and ganesha's design): it waits for the connection's bytes
in poll(2), reassembles records (RFC 5531 record marking, each capped by `max_record`; a bigger one
closes that connection only) and answers READ and UNSTABLE WRITE (`RpcService.try_fast`), and every
other call that needs no waiting (`RpcService.try_here`: GETATTR, LOOKUP, ... of a known handle; a
refusal), itself with the core lock held (below), when no other reply is being sent on the
connection, so such a call costs no trip through the event loop. Every other call is handed to the
loop in a task of its own (so a sync or a walk of the export holds up no other call). The
connection's task on the loop keeps its timers, waits for the byte budget or a call slot when the
thread needs one, and closes the socket (which ends the thread) when the connection ends. The
loop's drivers call plain non-blocking sockets and wait through trio only when a call would block.

Each UDP socket has a service thread (knfsd's nfsd threads, ganesha's workers): it waits in a
blocking recvfrom, so a call costs no trip through the event loop, and answers READ and UNSTABLE
WRITE (`try_fast`), and the other calls that need no waiting (`try_here`), itself with the *core
lock* held. The event loop holds that lock whenever it runs and lets go of it only while it waits
for I/O (`_CoreLock`, a trio instrument), so the sans-IO core never runs in two threads at once and
the loop never waits for a thread longer than one call. Any other call, or one that finds the loop
busy for `_CORE_WAIT`, is handed to the loop (`_udp_dispatch`), charged to the byte budget there
and answered as over TCP. At most `_MAX_HANDOFFS` datagrams are handed over and not yet admitted
(the socket's calls running at once are bounded as a connection's are); past that the thread stops
reading, and the socket's own queue (4 MiB) holds the rest, as it holds calls while all of knfsd's
threads are busy: the kernel drops only when that queue is full.

Memory is bounded server-wide: every connection and UDP socket draws from one `ByteBudget`
(nfs/budget.py) of `max_buffered` bytes: a record's bytes are
charged as they are read (a mark alone costs nothing, and a record's buffer grows only as its
bytes arrive), each connection within its fair share of the budget, and freed when the reply
has gone. Past the budget a reader stops reading, so TCP flow control holds the client back;
each connection keeps a small guaranteed part, so small calls get through however much big
records hold; and a record whose body stops coming closes its connection after `record_timeout`
seconds (not `idle_timeout`), so partial records cannot hold the budget.

Connections are closed when idle for `idle_timeout` (knfsd: 6 minutes) or when they send no RPC
call within `first_call_timeout` of connecting; at `max_connections` the connection idle the
longest is closed to make room for the new one (knfsd's svc_check_conn_limits), so idle peers
cannot lock clients out. Replies go out with `sendmsg` scatter-gather (READ data with its header
in one call), never copied into a bigger message.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import ipaddress
import logging
import math
import select
import socket as pysocket
import termios
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from nfs.auth import Squash
from nfs.budget import ByteBudget, Share
from nfs.clientstats import ClientStats
from nfs.drc import DuplicateRequestCache
from nfs.mount import MOUNT_PROGRAM, MOUNT_V3, MountProgram
from nfs.nfs3 import NFS_PROGRAM, NFS_V3
from nfs.nfsd import NfsProgram
from nfs.portmap import IPPROTO_TCP, IPPROTO_UDP, PMAP_PROGRAM, PMAP_V2, Mapping, PortmapProgram
from nfs.record import DEFAULT_MAX_RECORD, BufferPool, RecordDecoder, RecordTooLarge, record_mark
from nfs.sendfile import FileReadError, Part, hold, release, send_now
from nfs.store import Export, close_fds, default_state_dir, load_key
from nfs.svc import STREAM_MAX_REPLY, Buffer, CallContext, Pending, RpcProgram, RpcService
from nfs.writeback import DEFAULT_WRITE_BEHIND

log = logging.getLogger("netswap.nfs.server")

UDP_MAX_PAYLOAD = 65507
_SCRATCH = 16 * 1024  # small reads: record marks and small calls
_SOCK_BUF = 4 * 1024 * 1024
_MAX_LOWAT = 1024 * 1024  # a 1 MiB WRITE wakes the server once (the kernel grows the rcvbuf for it)
_CORE_WAIT = 0.002  # how long a UDP service thread waits for the event loop to let go of the core
_MAX_HANDOFFS = 64  # datagrams a UDP service thread may have handed to the event loop, not yet taken
LAUNDRETTE_DELAY = 2.0  # s between closings of idle cached fds: knfsd's NFSD_LAUNDRETTE_DELAY (2 * HZ)


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
    inflight_bytes: int = 8 * 1024 * 1024  # and the bytes one connection holds (records + calls)
    # One cap on the bytes of calls held over all connections (announced records and calls
    # running); each connection is guaranteed `conn_reserve` of it for small calls.
    max_buffered: int = 64 * 1024 * 1024
    conn_reserve: int = 64 * 1024 + 512
    squash: Squash = field(default_factory=Squash)  # root_squash, anonuid, anongid
    idle_timeout: float = 360.0  # close a connection idle this long (knfsd: 6 minutes)
    record_timeout: float = 5.0  # ... or whose record body stalls this long
    first_call_timeout: float = 5.0  # ... or one that sent no RPC call this long after connecting
    write_behind: int = DEFAULT_WRITE_BEHIND  # start a file's writeback every this many UNSTABLE bytes (0: never)


@dataclass
class ServerStats:
    tcp_connections: int = 0
    tcp_refused: int = 0
    tcp_evicted: int = 0  # idle connections closed to make room at the connection limit
    tcp_idle_closed: int = 0
    tcp_no_call_closed: int = 0
    oversized_records: int = 0
    stalled_records: int = 0  # connections closed because a record body stopped coming
    udp_datagrams: int = 0
    udp_send_errors: int = 0
    calls_now: int = 0  # calls run to their end at once, needing no waiting (a service thread's, or the loop's)
    udp_thread_calls: int = 0  # of which by a UDP socket's service thread
    tcp_thread_calls: int = 0  # of which by a TCP connection's service thread


def _readable(sock: pysocket.socket) -> int:
    """Bytes waiting in a socket's receive queue (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return buf[0]


class ListenError(OSError):
    """A service port could not be bound; the message names the address and why, in one line."""

    def __init__(self, host: str, port: int, e: OSError) -> None:
        reason = {errno.EADDRINUSE: "address in use", errno.EACCES: "permission denied",
                  errno.EADDRNOTAVAIL: "address not available"}.get(e.errno or 0, e.strerror or str(e))
        super().__init__(e.errno, f"cannot listen on {host}:{port}: {reason}")
        self.host, self.port = host, port

    def __str__(self) -> str:
        return str(self.strerror)


async def send_stream(sock: pysocket.socket, bufs: Sequence[Buffer]) -> None:
    """Send every buffer (and file slice, nfs/sendfile.py), in order, onto a non-blocking
    stream socket, handling partial sends. It waits (through trio) only when the socket is full,
    so a reply that fits costs no trip through the event loop."""
    parts = send_now(sock, list(bufs))
    if not parts:
        return
    # (While it waits the open-file cache may close a slice's fd: the rest keeps its own.)
    parts, held = hold(parts)
    try:
        while parts:
            await trio.lowlevel.wait_writable(sock)
            parts = send_now(sock, parts)
    finally:
        release(held)


async def send_datagram(sock: pysocket.socket, bufs: Sequence[Buffer], addr: Any) -> None:
    """Send the buffers as one datagram to `addr` from a non-blocking socket (waiting for room
    in its send buffer if need be)."""
    while True:
        try:
            # (The socket may be a blocking one. A UDP reply holds no FileSlice: nfsd preads a
            # READ's data for a datagram, nfs/sendfile.py.)
            sock.sendmsg(bufs, [], pysocket.MSG_DONTWAIT, addr)  # type: ignore[arg-type]
            return
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


def _send_datagram_now(sock: pysocket.socket, bufs: Sequence[Buffer], addr: Any, stats: ServerStats) -> bool:
    """Send a reply datagram without waiting; whether it went (a full send buffer, rare on a
    datagram socket, loses it like the network would: the client retransmits)."""
    try:
        sock.sendmsg(bufs, [], pysocket.MSG_DONTWAIT, addr)  # type: ignore[arg-type]  # (no FileSlice, as above)
    except OSError as e:
        stats.udp_send_errors += 1
        log.debug("udp sendmsg to %s: %s", addr, e)
        return False
    return True


def _own(tsock: trio.socket.SocketType) -> pysocket.socket:
    """The plain non-blocking socket under a trio one: the drivers call it directly (a call
    that succeeds costs no checkpoint) and wait through trio.lowlevel only when it would block.
    Close it with `_close`."""
    sock = pysocket.socket(fileno=tsock.detach())
    sock.setblocking(False)
    return sock


def _close(sock: pysocket.socket) -> None:
    trio.lowlevel.notify_closing(sock)
    sock.close()


class NfsServer:
    """MOUNT v3 + NFSv3 (+ portmap v2) for one exported directory."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        key = load_key(config.state_dir or default_state_dir())
        self.export = Export(config.export, key)
        names = [self.export.root, *config.names]
        self.pool = BufferPool(8)  # record buffers, shared by the connections
        self.nfs = NfsProgram(self.export, config.allow, max_io=config.max_io, squash=config.squash,
                              write_behind=config.write_behind)
        self.mount = MountProgram(self.export, names, config.allow)
        self.portmap = PortmapProgram() if config.portmap_port is not None else None
        programs: list[RpcProgram] = [self.nfs, self.mount]
        if self.portmap is not None:
            programs.append(self.portmap)
        self.svc = RpcService(programs, DuplicateRequestCache())
        self.stats = ServerStats()
        self.clients = ClientStats()  # per client address: calls, bytes, service times
        self.ports: dict[str, int] = {}
        self._conns: dict[int, _Conn] = {}
        # (+4: the UDP sockets, and a connection being closed while its successor starts.)
        if config.max_buffered - config.conn_reserve * (config.max_connections + 4) < config.max_record:
            raise ValueError(f"max_buffered {config.max_buffered} leaves less than one record of max_record "
                             f"{config.max_record} after {config.max_connections + 4} connection reserves of "
                             f"{config.conn_reserve}")
        self.budget = ByteBudget(config.max_buffered, config.conn_reserve, config.max_connections + 4)
        self._core = threading.Lock()  # the sans-IO core's: the event loop's, or a UDP service thread's

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
                raise ListenError(self.config.bind, port, e) from None
            tcp.listen(128)
            udp.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_RCVBUF, 4 * 1024 * 1024)
            return tcp, udp
        raise ListenError(self.config.bind, port, OSError(errno.EADDRINUSE, "no free port for both TCP and UDP"))

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
                # The portmapper lists itself first, on its own port, as rpcbind does (rpcinfo -p
                # and GETPORT of 100000 v2 find it), then MOUNT and NFS.
                for prog, vers, name in ((PMAP_PROGRAM, PMAP_V2, "portmap"), (NFS_PROGRAM, NFS_V3, "nfs"),
                                         (MOUNT_PROGRAM, MOUNT_V3, "mount")):
                    for prot in (IPPROTO_TCP, IPPROTO_UDP):
                        self.portmap.set(Mapping(prog, vers, prot, self.ports[name]))
            self.nfs.loop_token = trio.lowlevel.current_trio_token()
            self._core.acquire()  # (free: no service thread runs yet)
            core = _CoreLock(self._core)
            trio.lowlevel.add_instrument(core)
            try:
                async with trio.open_nursery() as nursery:
                    for _, tcp, udp in socks:
                        nursery.start_soon(self._accept_loop, tcp, nursery)
                        await nursery.start(self._udp_loop, udp)
                    nursery.start_soon(self._laundrette)
                    task_status.started(dict(self.ports))
            finally:
                trio.lowlevel.remove_instrument(core)
                self._core.release()
        finally:
            for _, tcp, udp in socks:
                tcp.close()
                udp.close()
            self.export.close()

    async def _laundrette(self) -> None:
        """Every LAUNDRETTE_DELAY, take the open-file cache's fds that were not used since the
        last round out of it (`Export.expire_idle`; on the loop, so with the core lock held: no
        service thread is using an fd meanwhile, and worker threads use their own dups), then
        close them in a worker thread, without the lock: the last close of a file removed
        behind our back frees its page cache and blocks, tens of ms during which the service
        threads would wait for the lock."""
        while True:
            await trio.sleep(LAUNDRETTE_DELAY)
            if fds := self.export.expire_idle():
                await trio.to_thread.run_sync(close_fds, fds)
                log.debug("closed %d idle cached file(s)", len(fds))

    async def _accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            try:
                sock, peer = await listener.accept()
            except OSError as e:  # EMFILE and friends: back off, keep serving
                log.warning("accept: %s", e)
                await trio.sleep(0.05)
                continue
            if len(self._conns) >= self.config.max_connections and not self._evict_idle():
                self.stats.tcp_refused += 1
                sock.close()
                continue
            self.stats.tcp_connections += 1
            nursery.start_soon(self._tcp_conn, sock, peer)

    def _evict_idle(self) -> bool:
        """At the connection limit: close the connection idle the longest (no call running), as
        knfsd's svc_check_conn_limits does, so idle peers cannot lock new clients out."""
        idle = [c for c in self._conns.values() if c.share.calls == 0 and not c.scope.cancel_called]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.last_active)
        log.info("%s:%d: closed at the connection limit (idle the longest)", *victim.peer)
        self.stats.tcp_evicted += 1
        victim.scope.cancel()
        del self._conns[id(victim)]  # (its task ends soon; the new connection takes its place)
        return True

    async def _tcp_conn(self, tsock: trio.socket.SocketType, peer: tuple[Any, ...]) -> None:
        """A TCP connection: its service thread (`_tcp_thread`) reads the records and answers
        the hot calls; this task keeps the connection's timers (`_Conn.arm`, re-armed every
        tick from what the thread saw), runs the calls the thread hands over, and closes the
        socket (which ends the thread) when a timer fires, the server stops or the thread ends."""
        sock = _own(tsock)
        sock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)
        # Room for a whole 1 MiB WRITE or READ in flight: a window that autotuning grows only
        # step by step stalled the client's send in the middle of each big call.
        sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_RCVBUF, _SOCK_BUF)
        sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_SNDBUF, _SOCK_BUF)
        dec = RecordDecoder(self.config.max_record, self.pool)
        host, port = str(peer[0]), int(peer[1])
        conn = _Conn((host, port), self.budget.share(self.config.inflight_bytes, self.config.max_inflight), dec,
                     trio.current_time(), self.config)
        self._conns[id(conn)] = conn
        t = _TcpStream(sock, conn, trio.lowlevel.current_trio_token(), trio.lowlevel.current_clock(),
                       self.nfs.note_unreadable)
        thread = threading.Thread(target=self._tcp_thread, args=(t,), name=f"nfsd-tcp-{host}:{port}", daemon=True)
        cfg = self.config
        tick = min(1.0, cfg.record_timeout / 4, cfg.first_call_timeout / 4, cfg.idle_timeout / 4)
        try:
            with conn.scope:
                conn.arm()
                async with trio.open_nursery() as calls:
                    t.calls = calls
                    thread.start()
                    while not t.ended.is_set():
                        with trio.move_on_after(tick):
                            await t.ended.wait()
                        conn.arm()  # (the thread moved last_active and the record state on)
                    if t.oversized:
                        calls.cancel_scope.cancel()
            if conn.scope.cancelled_caught and not conn.evicted_by(self._conns):
                if not conn.got_call:
                    self.stats.tcp_no_call_closed += 1
                    log.info("%s:%d: no call within %.1fs of connecting, closing", host, port,
                             self.config.first_call_timeout)
                elif dec.in_record:
                    self.stats.stalled_records += 1
                    log.info("%s:%d: a record stalled for %.1fs, closing", host, port, self.config.record_timeout)
                else:
                    self.stats.tcp_idle_closed += 1
                    log.info("%s:%d: idle for %.0fs, closing", host, port, self.config.idle_timeout)
        except Exception:  # a bug must cost this connection, never the server
            log.exception("%s:%d: connection failed", host, port)
        finally:
            t.closing = True
            with contextlib.suppress(OSError):
                sock.shutdown(pysocket.SHUT_RDWR)  # (wakes the thread: its recv sees the end)
            if thread.is_alive():
                with trio.CancelScope(shield=True):
                    await t.ended.wait()
                thread.join()
            self._conns.pop(id(conn), None)
            conn.share.close()
            _close(sock)

    # -- the TCP service thread ------------------------------------------------------------------

    def _count_oversized(self) -> None:
        self.stats.oversized_records += 1

    def _tcp_thread(self, t: _TcpStream) -> None:
        """An nfsd thread for a TCP connection (knfsd's and ganesha's design): it waits for the
        connection's bytes itself (poll(2), no trip through the event loop per call), feeds the
        record decoder (RFC 5531 record marking), charges what arrived to the byte budget as the
        event loop did, and answers READ and UNSTABLE WRITE (`try_fast`) and the other calls
        that need no waiting (`try_here`) with the core lock held when no other reply is being
        sent on the connection; every other call is handed to the loop (`_tcp_handoff`).
        Whenever it would wait for the budget or a call slot, the loop waits for it
        (`_tcp_wait`), so the budget's rules stay the loop's. Its end (the peer's,
        a bad record, the loop closing the socket) is told to the loop by `t.ended`."""
        sock, core, conn, dec = t.sock, self._core, t.conn, t.conn.dec
        host, port = conn.peer
        scratch = bytearray(_SCRATCH)
        scratch_mv = memoryview(scratch)
        pending = scratch_mv[:0]  # bytes read into the scratch buffer, not yet fed to the decoder
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        lowat = 1
        try:
            while not t.closing:
                # Under the core lock: what arrived is decoded and charged, whole records run.
                with core:
                    pending = pending[dec.feed(pending, stop_after_mark=True):] if pending else pending
                    wait = self._tcp_records(t)
                    body = not pending and dec.frag_left >= _SCRATCH
                if wait is not None:
                    if not self._tcp_wait(t, wait):
                        return
                    if wait[0] == "charge":
                        with core:
                            t.charged += wait[1]
                    continue
                if t.unsent:
                    if not self._tcp_finish_send(t):
                        return
                    continue
                if pending:
                    continue
                if body:
                    # Inside a big fragment: receive straight into the record, once the kernel
                    # says a good part of it is there (SO_RCVLOWAT); what is there is charged
                    # (and the record's buffer grown) before it is read.
                    lo = min(dec.frag_left, _MAX_LOWAT)
                    queued = _readable(sock)
                    if queued < lo:
                        if lo != lowat:
                            sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_RCVLOWAT, lo)
                            lowat = lo
                        if not poller.poll(self.config.record_timeout / 2 * 1000):
                            # Below the low-water mark the bytes wait in the kernel: if more
                            # came, the record is slow, not stalled.
                            queued = _readable(sock)
                            if queued > conn.queued:
                                conn.queued = queued
                                conn.last_active = t.clock.current_time()
                            continue
                        queued = _readable(sock)
                    conn.queued = 0
                    with core:
                        want = min(dec.frag_left, max(queued, 1))
                        if not conn.share.try_acquire(want):
                            wait = ("charge", want)
                        else:
                            buf = dec.get_buffer(hint=want)
                    if wait is not None:
                        if not self._tcp_wait(t, wait):
                            return
                        with core:
                            buf = dec.get_buffer(hint=want)
                    assert buf is not None
                    try:
                        with buf, buf[:want] as chunk:
                            n = sock.recv_into(chunk)
                    except BlockingIOError:
                        n = -1
                    with core:
                        if n < 0:  # (the bytes FIONREAD saw went elsewhere: wait again)
                            self._share_release(t, want)
                            continue
                        self._share_release(t, want - n)
                        if n == 0:
                            return
                        t.charged += n
                        dec.commit(n)
                    conn.last_active = t.clock.current_time()
                    continue
                # A small read: marks and small calls, which stay in the scratch buffer until
                # the marks' bytes have been charged.
                if lowat != 1:
                    sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_RCVLOWAT, 1)
                    lowat = 1
                try:
                    n = sock.recv_into(scratch)
                except BlockingIOError:
                    poller.poll(1000)  # (the loop's shutdown of the socket wakes it at once)
                    try:  # (straight on: nothing else changed while it waited)
                        n = sock.recv_into(scratch)
                    except BlockingIOError:
                        continue
                if n == 0:
                    return  # the calls in flight still get their replies
                pending = scratch_mv[:n]
                conn.last_active = t.clock.current_time()
        except RecordTooLarge as e:
            with contextlib.suppress(trio.RunFinishedError):  # (counted by the loop: no core lock here)
                t.token.run_sync_soon(self._count_oversized)
            log.warning("%s:%d: %s; closing the connection", host, port, e)
            t.oversized = True
        except OSError as e:
            log.debug("%s:%d: connection ended: %s", host, port, e)
        except BaseException:  # a bug must cost this connection, never the server
            log.exception("%s:%d: connection's service thread failed", host, port)
            t.oversized = True  # (closes it, calls and all)
        finally:
            release(t.unsent_fds)  # (a READ's data left unsent: its fd)
            with contextlib.suppress(trio.RunFinishedError):
                t.token.run_sync_soon(t.ended.set)

    def _tcp_records(self, t: _TcpStream) -> tuple[str, int] | None:
        """With the core lock held: charge what arrived, and run every whole record (answered
        here, or handed to the loop). What the thread must wait for first, if anything."""
        conn, dec = t.conn, t.conn.dec
        while True:
            owed = dec.received - t.charged
            if owed > 0:
                if not conn.share.try_acquire(owed):
                    return ("charge", owed)
                t.charged += owed
            if t.held is None:
                rec = dec.next_record()
                if rec is None:
                    return None
                t.charged -= len(rec)  # (the record's bytes stay charged until its reply has gone)
                if conn.share.calls >= conn.share.max_calls:
                    t.held = rec
                    return ("slot", 0)
                conn.share.calls += 1
            else:
                rec, t.held = t.held, None  # (its call slot was taken by the loop)
            self._tcp_call_now(t, rec)
            if t.unsent:
                return None  # (the rest of its reply goes first)

    def _tcp_call_now(self, t: _TcpStream, rec: memoryview) -> None:
        """With the core lock held: answer a call that needs no waiting here (its reply goes
        before the reply cache and the statistics are kept, `_TcpStream.send`), or hand it to
        the loop."""
        conn = t.conn
        t0 = time.perf_counter()  # the call's service time starts (per-client statistics)
        conn.last_active = t.clock.current_time()
        if not conn.got_call and looks_like_call(rec):
            conn.got_call = True
        reply = None
        if not t.send_lock.locked() and not t.sending:
            t.reply_bytes = -1
            reply = self.svc.try_fast(rec, conn.peer[0], "tcp", STREAM_MAX_REPLY, t.send)
            if reply is None:
                reply = self.svc.try_here(rec, CallContext(conn.peer[0], conn.peer[1], "tcp"), t.send)
        if reply is None:
            t.token.run_sync_soon(self._tcp_handoff, t, rec, t0)
            return
        if t.reply_bytes < 0:  # (a reply from the reply cache)
            t.send(reply)
        stats = self.stats
        stats.calls_now += 1
        stats.tcp_thread_calls += 1
        n = len(rec)
        conn.dec.recycle(rec)  # nothing refers to the call any more: reuse its buffer
        if t.reply_bytes > 0:
            self.clients.record(conn.peer[0], n, t.reply_bytes, time.perf_counter() - t0)
        self._share_end_call(t, n)

    def _tcp_finish_send(self, t: _TcpStream) -> bool:
        """Without the core lock: the rest of a reply the socket had no room for; whether the
        connection is still good."""
        parts = t.unsent
        ok = True
        poller = select.poll()
        poller.register(t.sock.fileno(), select.POLLOUT)
        try:
            while parts and not t.closing:
                parts = send_now(t.sock, parts)
                if parts:
                    poller.poll(1000)
        except OSError as e:
            log.debug("%s:%d: reply not sent: %s", *t.conn.peer, e)
            if isinstance(e, FileReadError):
                with self._core:
                    t.note_unreadable(e.ino)
            ok = False
            # The record is cut short (a READ's file cut short before its data went leaves the
            # connection itself good): end it before a reply the loop holds back for this one
            # can go, or the client would read that reply as the rest of this one's data.
            t.cut()
        finally:
            release(t.unsent_fds)
        with self._core:
            t.unsent = []
            t.sending = False
            if t.send_waiter is not None:
                t.token.run_sync_soon(t.send_waiter.set)
        return ok and not t.closing

    def _tcp_wait(self, t: _TcpStream, what: tuple[str, int]) -> bool:
        """Without the core lock: wait for the loop to charge bytes to the connection's share
        (`charge`) or start a call in it (`slot`), as the loop's reader did; False if the
        connection closes meanwhile."""
        done = threading.Event()
        ok: list[bool] = []
        kind, n = what

        async def waiter() -> None:
            try:
                if kind == "charge":
                    await t.conn.charge(n)
                else:
                    await t.conn.share.start_call()
                ok.append(True)
            finally:
                done.set()

        def spawn() -> None:
            try:
                assert t.calls is not None
                t.calls.start_soon(waiter)
            except RuntimeError:  # (the connection's nursery is closing)
                done.set()

        try:
            t.token.run_sync_soon(spawn)
        except trio.RunFinishedError:
            return False
        while not done.wait(0.5):
            if t.closing:
                return False
        return bool(ok) and not t.closing

    def _share_release(self, t: _TcpStream, n: int) -> None:
        """With the core lock held, in the thread: give bytes back (waking any task waiting for
        the budget is the loop's: trio's events are not to be set from another thread)."""
        if self.budget._waiting:
            t.token.run_sync_soon(t.conn.share.release, n)
        else:
            t.conn.share.release(n)

    def _share_end_call(self, t: _TcpStream, n: int) -> None:
        if self.budget._waiting:
            t.token.run_sync_soon(self._loop_end_call, t, n)
        else:
            t.conn.share.end_call(n)

    def _loop_end_call(self, t: _TcpStream, n: int) -> None:
        t.conn.share.end_call(n)
        t.conn.touch()

    def _tcp_handoff(self, t: _TcpStream, rec: memoryview, t0: float) -> None:
        """On the event loop: a call the thread did not answer gets a task (its call slot and
        bytes were taken by the thread)."""
        try:
            assert t.calls is not None
            t.calls.start_soon(self._tcp_call, t, rec, t0)
        except RuntimeError:  # (the connection is closing: the call goes with it)
            t.conn.dec.recycle(rec)
            t.conn.share.end_call(len(rec))

    async def _tcp_call(self, t: _TcpStream, rec: memoryview, t0: float) -> None:
        """A call handed over by the thread: run to its end (at once when it needs no waiting,
        `try_now`), its reply sent when no other is being sent on the connection."""
        conn = t.conn
        n = len(rec)
        reply: list[Buffer] | None = None
        host, port = conn.peer
        try:
            ctx = CallContext(host, port, "tcp")
            p = self.svc.begin(rec, ctx)
            if isinstance(p, Pending):
                reply = self.svc.try_now(p, ctx)
                if reply is None:
                    reply = await self.svc.finish(p, ctx)
                else:
                    self.stats.calls_now += 1
            else:
                reply = p
                self.stats.calls_now += 1
            conn.dec.recycle(rec)  # nothing refers to the call any more: reuse its buffer
            if reply is not None:
                total = sum(len(b) for b in reply)
                async with t.send_lock:
                    while t.sending:  # (the thread is sending the rest of a reply)
                        t.send_waiter = trio.Event()
                        await t.send_waiter.wait()
                    t.send_waiter = None
                    await send_stream(t.sock, [record_mark(total), *reply])
                self.clients.record(host, n, total, time.perf_counter() - t0)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.debug("%s:%d: reply not sent: %s", host, port, e)
        finally:
            conn.share.end_call(n)
            conn.touch()

    async def _udp_loop(self, tsock: trio.socket.SocketType, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """A UDP socket: its service thread reads it (blocking) and answers the hot calls itself;
        the rest come here (`_udp_dispatch`), to be answered as over TCP."""
        sock = _own(tsock)
        sock.setblocking(True)  # (the thread blocks in recvfrom; the loop sends with MSG_DONTWAIT)
        u = _UdpSocket(sock, self.budget.share(self.config.inflight_bytes, self.config.max_inflight * 4),
                       trio.lowlevel.current_trio_token(), self.stats)
        thread = threading.Thread(target=self._udp_thread, args=(u,), name=f"nfsd-udp-{sock.getsockname()[1]}",
                                  daemon=True)
        try:
            async with trio.open_nursery() as calls:
                u.calls = calls
                thread.start()
                task_status.started()
                await trio.sleep_forever()
        finally:
            u.closed = True
            with contextlib.suppress(OSError):
                sock.shutdown(pysocket.SHUT_RDWR)  # (wakes the thread's recvfrom; ENOTCONN for UDP)
            if thread.is_alive():
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(thread.join, 5.0)
            u.share.close()
            _close(sock)

    def _udp_thread(self, u: _UdpSocket) -> None:
        """An nfsd thread for a UDP socket: it waits in recvfrom (no trip through the event loop
        per call) and answers the hot calls (`try_fast`: READ, UNSTABLE WRITE) and the others
        that need no waiting (`try_here`) with the core lock held, which the event loop lets go
        of only while it waits for I/O; a call needing more, or one that comes while the loop
        runs, is handed to the loop (at most _MAX_HANDOFFS
        handed over and not yet admitted: past that the thread waits, and the socket's queue
        holds what comes). A call answered here holds its one datagram while it runs, in the
        thread's own receive buffer (as an nfsd thread's rq_pages: nothing is allocated per
        datagram); no buffering beyond that, so it is not charged to the byte budget. A
        datagram handed over is copied out of it."""
        sock, core = u.sock, self._core
        buf = bytearray(UDP_MAX_PAYLOAD + 1)
        view = memoryview(buf)
        while not u.closed:
            try:
                n, addr = sock.recvfrom_into(buf)
            except OSError as e:  # e.g. ECONNREFUSED from an earlier ICMP error
                log.debug("udp recvfrom: %s", e)
                continue
            if u.closed or addr is None:
                return
            if core.acquire(timeout=_CORE_WAIT):
                try:
                    if self._udp_now(u, view[:n], addr):
                        continue
                except Exception:  # a bug must cost this call, never the server
                    log.exception("udp call from %s failed", addr)
                    continue
                finally:
                    core.release()
            data = bytes(view[:n])
            while not u.handoffs.acquire(timeout=0.1):
                if u.closed:
                    return
            try:
                u.token.run_sync_soon(self._udp_dispatch, u, data, addr)
            except trio.RunFinishedError:
                return

    def _udp_now(self, u: _UdpSocket, data: memoryview, addr: Any) -> bool:
        """In the service thread, with the core lock held: answer a call that needs no
        waiting; False if it is not one (nothing done). The reply goes before the reply cache
        and the statistics are kept (`_UdpSocket.send`), off the client's wait."""
        t0 = time.perf_counter()
        host = addr[0]
        u.addr, u.sent = addr, None
        reply = self.svc.try_fast(data, host, "udp", UDP_MAX_PAYLOAD, u.send)
        if reply is None:
            reply = self.svc.try_here(data, CallContext(host, int(addr[1]), "udp", max_reply=UDP_MAX_PAYLOAD), u.send)
            if reply is None:
                return False
        stats = self.stats
        stats.udp_datagrams += 1
        stats.calls_now += 1
        stats.udp_thread_calls += 1
        if u.sent is None:  # (a reply from the reply cache)
            u.send(reply)
        if u.sent:
            self.clients.record(host, len(data), sum(map(len, reply)), time.perf_counter() - t0)
        return True

    def _udp_dispatch(self, u: _UdpSocket, data: bytes, addr: Any) -> None:
        """On the event loop: a datagram the service thread handed over. Admitted to the
        socket's calls and charged to the byte budget, then answered here when it needs no
        waiting, else in a task. If the socket's calls or bytes are at their limit, it waits
        for room in a task, still counted as handed over (so the thread stops reading)."""
        if u.closed or u.calls is None:
            u.handoffs.release()
            return
        self.stats.udp_datagrams += 1
        if not u.share.try_start_call(len(data)):
            u.calls.start_soon(self._udp_admit, u, data, addr)
            return
        u.handoffs.release()
        self._udp_run(u, data, addr)

    async def _udp_admit(self, u: _UdpSocket, data: bytes, addr: Any) -> None:
        """A handed-over datagram waits for room among the socket's calls, as a TCP record
        waits for its connection's."""
        try:
            await u.share.acquire(len(data))
            try:
                await u.share.start_call()
            except BaseException:
                u.share.release(len(data))
                raise
        finally:
            u.handoffs.release()
        self._udp_run(u, data, addr)

    def _udp_run(self, u: _UdpSocket, data: bytes, addr: Any) -> None:
        """An admitted datagram (its call started, its bytes charged): answered now or in a task."""
        assert u.calls is not None
        n = len(data)
        t0 = time.perf_counter()
        host = str(addr[0])
        try:
            reply = self.svc.try_fast(data, host, "udp", UDP_MAX_PAYLOAD)
            if reply is None:
                ctx = CallContext(host, int(addr[1]), "udp", max_reply=UDP_MAX_PAYLOAD)
                p = self.svc.begin(data, ctx)
                reply = self.svc.try_now(p, ctx) if isinstance(p, Pending) else p
                if reply is None and isinstance(p, Pending):
                    u.calls.start_soon(self._udp_call, u.sock, data, addr, u.share, p, ctx, t0)
                    return
            if reply is not None:
                self.stats.calls_now += 1
                out = sum(len(b) for b in reply)
                if _send_datagram_now(sock=u.sock, bufs=reply, addr=addr, stats=self.stats):
                    self.clients.record(host, n, out, time.perf_counter() - t0)
        except Exception:  # a bug must cost this call, never the server
            log.exception("udp call from %s failed", addr)
        u.share.end_call(n)

    async def _udp_send(self, sock: pysocket.socket, reply: list[Buffer], addr: Any) -> bool:
        """Send a reply; whether it went."""
        try:
            await send_datagram(sock, reply, addr)
        except (OSError, trio.BusyResourceError) as e:  # (the latter: another reply waits for room)
            self.stats.udp_send_errors += 1
            log.debug("udp sendmsg to %s: %s", addr, e)
            return False
        return True

    async def _udp_call(self, sock: pysocket.socket, data: bytes, addr: tuple[Any, ...], share: Share,
                        p: Pending, ctx: CallContext, t0: float) -> None:
        try:
            reply = await self.svc.finish(p, ctx)
            if reply is not None:
                out = sum(len(b) for b in reply)
                if await self._udp_send(sock, reply, addr):
                    self.clients.record(ctx.host, len(data), out, time.perf_counter() - t0)
        except Exception:  # a bug must cost this call, never the server
            log.exception("udp call from %s failed", addr)
        finally:
            share.end_call(len(data))

    def buffer_stats(self) -> dict[str, int]:
        """What the server holds of its clients' calls now: `buffered` (charged to the budget),
        its `high_water`, the `limit`, and the memory the connections' decoders hold."""
        return {"buffered": self.budget.used, "high_water": self.budget.high_water, "limit": self.budget.limit,
                "decoder_bytes": sum(c.dec.allocated for c in self._conns.values()),
                "budget_waits": self.budget.waits, "connections": len(self._conns)}


class _TcpStream:
    """A TCP connection's state shared by its service thread and the event loop (changed under
    the core lock, or by one side only)."""

    def __init__(self, sock: pysocket.socket, conn: _Conn, token: trio.lowlevel.TrioToken,
                 clock: trio.abc.Clock, note_unreadable: Callable[[int], None]) -> None:
        self.sock = sock
        self.note_unreadable = note_unreadable  # (NfsProgram's: called with the core lock held)
        self.conn = conn
        self.token = token
        self.clock = clock  # (the loop's clock, read by the thread for the connection's timers)
        self.calls: trio.Nursery | None = None
        self.send_lock = trio.StrictFIFOLock()  # a reply being sent by the loop
        self.sending = False  # the thread is sending the rest of a reply (`unsent`)
        self.unsent: list[Part] = []
        self.unsent_fds: list[int] = []  # the fds of the slices in `unsent` (dups of the cache's), closed once sent
        self.send_waiter: trio.Event | None = None  # a loop task waiting for `sending` to end
        self.charged = 0  # bytes of the decoder's `received` already charged to the budget
        self.held: memoryview | None = None  # a record waiting for a call slot
        self.ended = trio.Event()  # the thread has ended (set on the loop)
        self.closing = False  # the loop is closing the connection
        self.oversized = False  # the thread ended on a bad record: its calls go too
        self.reply_bytes = 0  # the thread's call: bytes of its reply sent (0: failed, -1: none yet)

    def send(self, reply: list[Buffer]) -> None:
        """With the core lock held, in the service thread: a reply, record mark first, as far
        as the socket takes it now; the rest (`unsent`) the thread sends without the lock."""
        total = 0
        for b in reply:
            total += len(b)
        try:
            left = send_now(self.sock, [record_mark(total), *reply])
            if left:
                # (The rest goes without the core lock: a READ's data keeps an fd of its own.)
                self.unsent, self.unsent_fds = hold(left)
                self.sending = True
            self.reply_bytes = total
        except OSError as e:
            # (A reset or broken connection; or a READ's file cut short before its data went,
            # nfs/sendfile.py.) A TCP client recovers a lost reply only by reconnecting (it
            # sends its calls again then): end the connection.
            log.debug("%s:%d: reply not sent: %s", *self.conn.peer, e)
            if isinstance(e, FileReadError):
                self.note_unreadable(e.ino)
            self.reply_bytes = 0
            self.cut()

    def cut(self) -> None:
        """End the connection after a reply that did not (wholly) go: the client sends its calls
        again on a new one."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(pysocket.SHUT_RDWR)


class _UdpSocket:
    """A UDP socket's state, shared by its service thread and the event loop."""

    def __init__(self, sock: pysocket.socket, share: Share, token: trio.lowlevel.TrioToken,
                 stats: ServerStats) -> None:
        self.sock = sock
        self.share = share
        self.token = token
        self.handoffs = threading.BoundedSemaphore(_MAX_HANDOFFS)  # datagrams handed to the loop, not yet taken
        self.calls: trio.Nursery | None = None
        self.closed = False
        self.stats = stats
        self.addr: Any = None  # the thread's call: its sender, and whether its reply went
        self.sent: bool | None = None

    def send(self, reply: list[Buffer]) -> None:
        """The service thread's reply to its call's sender."""
        self.sent = _send_datagram_now(self.sock, reply, self.addr, self.stats)


class _CoreLock(trio.abc.Instrument):
    """The event loop holds the core lock while it runs and lets go of it only while it waits
    for I/O, so a UDP service thread that takes it has the sans-IO core (reply cache, handle
    and fd caches, statistics) to itself, and never waits for it."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock

    def before_io_wait(self, timeout: float) -> None:
        self.lock.release()

    def after_io_wait(self, timeout: float) -> None:
        self.lock.acquire()


class _Conn:
    """A TCP connection's state for the idle rules: closed when no valid call came within
    `first_call_timeout` of connecting, when part of a record came and the rest did not for
    `record_timeout`, or when nothing happened for `idle_timeout` while no call was running
    (knfsd closes idle temporary sockets after 6 minutes)."""

    def __init__(self, peer: tuple[str, int], share: Share, dec: RecordDecoder, now: float,
                 config: ServerConfig) -> None:
        self.peer = peer
        self.share = share
        self.dec = dec
        self.opened = now
        self.last_active = now
        self.got_call = False
        self.waiting = False  # for the byte budget: no bytes are read, so none can be late
        self.queued = 0  # bytes of a record seen waiting in the kernel (below SO_RCVLOWAT)
        self.scope = trio.CancelScope()
        self.first_call_timeout = config.first_call_timeout
        self.idle_timeout = config.idle_timeout
        self.record_timeout = config.record_timeout

    async def charge(self, n: int) -> None:
        """Charge n bytes to the connection's share, waiting (not timed) for room."""
        if self.share.try_acquire(n):
            return
        self.waiting = True
        self.arm()
        try:
            await self.share.acquire(n)
        finally:
            self.waiting = False
            self.touch()

    def arm(self) -> None:
        deadline = math.inf
        if self.dec.in_record and not self.waiting:
            # Part of a record came and the rest stopped coming: time it out in seconds, so a
            # client cannot hold buffers (and its fair share) with records it never finishes.
            deadline = self.last_active + self.record_timeout
        if not self.got_call and self.share.calls == 0:
            deadline = min(deadline, self.opened + self.first_call_timeout)
        elif not self.share.calls and not self.dec.in_record:
            deadline = self.last_active + self.idle_timeout
        if deadline != self.scope.deadline:  # (setting it costs trio a deadline-heap update)
            self.scope.deadline = deadline

    def touch(self) -> None:
        self.last_active = trio.current_time()
        self.arm()

    def evicted_by(self, conns: dict[int, _Conn]) -> bool:
        return id(self) not in conns


def looks_like_call(msg: memoryview | bytes) -> bool:
    """An RPC call header (msg_type CALL, rpcvers 2): enough to say the peer speaks RPC."""
    return len(msg) >= 24 and msg[4:8] == b"\0\0\0\0" and msg[8:12] == b"\0\0\0\2"


def parse_allow(values: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(v, strict=False) for v in values]


__all__ = ["ListenError", "NfsServer", "ServerConfig", "parse_allow", "send_datagram", "send_stream"]
