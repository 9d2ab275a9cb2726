"""The iSCSI target's trio driver: accept connections, run login, then pump PDUs through a session.

Thin on purpose: framing is `PduReader`, login is `TargetLogin`, the full feature phase is
`TargetSession`. Per connection the loop is: drain every complete PDU from what arrived, fsync the
LUNs whose answers need it (off the event loop), send the answers (one write per ANSWER_BATCH of
them), receive again.

Connections that have not logged in yet are bounded: each has `login_timeout` seconds, and when one
source address holds too many (or all sources together do), the oldest of them is closed to make
room, so a flood of connections that never log in cannot lock a real initiator out.

Per client address the driver counts the SCSI commands answered and their service times
(`clients`, iscsi/target_stats.py): a command's time runs from the read that brought it (the
session's `now`) to the write that handed its answer to the socket, after any fsync it waited for.
Two clock reads per round and one list append per command: the hot loop stays cheap.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence

import trio

from .keys import TargetPrefs
from .login import LoginConfig, LoginResult, LoginStatus, TargetLogin
from .lun import DiskLun
from .pdu import DataDigestError, PduError, PduReader
from .session import CMD_WINDOW, TargetCore, TargetSession
from .target_stats import ClientStat, TargetStats

log = logging.getLogger("iscsi.target")

LOGIN_TIMEOUT = 10.0  # seconds from accept to the full feature phase
LOGIN_MAX_DATA = 8192  # login PDUs carry at most 8192 bytes of text (RFC 7143 §6.1)
RECV_SIZE = 256 << 10
MAX_CONNECTIONS = 256  # open connections of every kind
MAX_PENDING_LOGINS = 64  # connections not logged in yet, all sources together
MAX_PENDING_PER_SOURCE = 16  # ... from one source address
NOP_MISSES = 3
# Answers of one read go out at most this many at a time. All of a round in one write makes a
# lock-step: the initiator idles while we execute its whole batch, we idle while it makes the
# next (one core's worth of work between the two). Sending every 8 answers splits a 16-deep queue
# into two halves that the two sides work on at once, for one more write per 8 commands (tgtd
# gets the same overlap by sending each answer when its worker thread finishes the command).
ANSWER_BATCH = 8
CONNECTION_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Target:
    """An iSCSI target serving `luns` as `target_name`."""

    def __init__(
        self,
        target_name: str,
        luns: dict[int, DiskLun],
        *,
        allow_initiators: list[str] | None = None,
        chap: tuple[str, str] | None = None,
        prefs: TargetPrefs | None = None,
        nop_interval: float = 0.0,
        max_connections: int = MAX_CONNECTIONS,
        max_pending_logins: int = MAX_PENDING_LOGINS,
        max_pending_per_source: int = MAX_PENDING_PER_SOURCE,
        login_timeout: float = LOGIN_TIMEOUT,
        cmd_window: int = CMD_WINDOW,
    ) -> None:
        self.core = TargetCore(target_name, luns)
        self.login_config = LoginConfig(
            target_name=target_name,
            allow_initiators=frozenset(allow_initiators) if allow_initiators else None,
            chap=chap,
            prefs=prefs or TargetPrefs(),
        )
        self.nop_interval = nop_interval
        self.cmd_window = cmd_window
        self.max_connections = max_connections
        self.max_pending_logins = max_pending_logins
        self.max_pending_per_source = max_pending_per_source
        self.login_timeout = login_timeout
        self._tsih = itertools.count(1)
        self._conn_ids = itertools.count(1)
        self.connections = 0
        # Connections still logging in, oldest first: id -> (source address, its login's cancel scope).
        self.pending: OrderedDict[int, tuple[str, trio.CancelScope]] = OrderedDict()
        self.by_nexus: dict[tuple[str, bytes], trio.CancelScope] = {}
        self.stats = {"connections": 0, "logins": 0, "login_failures": 0, "login_timeouts": 0, "evicted": 0,
                      "refused": 0, "protocol_errors": 0, "handler_errors": 0}
        self.clients = TargetStats()  # per client address: commands, bytes, service times

    def new_tsih(self) -> int:
        t = next(self._tsih) & 0xFFFF
        return t or self.new_tsih()

    async def serve(self, host: str = "127.0.0.1", port: int = 3260, *,
                    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        await self.serve_listeners(listeners, task_status=task_status)

    async def serve_listeners(self, listeners: Sequence[trio.SocketListener], *,
                              task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED) -> None:
        sockname = listeners[0].socket.getsockname()
        self.core.portal = f"{sockname[0]}:{sockname[1]}"
        async with trio.open_nursery() as nursery:
            task_status.started(list(listeners))
            await trio.serve_listeners(self.handle, list(listeners), handler_nursery=nursery)

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            peer = "%s:%d" % stream.socket.getpeername()[:2]
        except OSError:
            peer = "?"
        source = peer.rsplit(":", 1)[0]
        if self.connections >= self.max_connections and not self._evict(None):
            self.stats["refused"] += 1
            log.info("%s: refused, %d connections open", peer, self.connections)
            await stream.aclose()
            return
        self.connections += 1
        self.stats["connections"] += 1
        try:
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await self._connection(stream, peer, source)
        except Exception as e:
            gone = _connection_error(e)
            if gone is not None:  # the peer went away (reset, closed): that connection ends, nothing else
                log.info("%s: connection lost: %s", peer, gone)
            else:
                # A bug provoked by one peer's input costs that connection only, never the target.
                self.stats["handler_errors"] += 1
                log.exception("%s: connection handler failed; closing that connection", peer)
        finally:
            self.connections -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    def _evict(self, source: str | None) -> bool:
        """Close the oldest connection still logging in (from `source`, or from anywhere)."""
        for conn_id, (src, scope) in self.pending.items():
            if source is None or src == source:
                del self.pending[conn_id]
                scope.cancel()
                self.stats["evicted"] += 1
                log.info("%s: a login from it was still pending; closing the oldest to make room", src)
                return True
        return False

    async def _connection(self, stream: trio.SocketStream, peer: str, source: str) -> None:
        reader = PduReader(max_data=LOGIN_MAX_DATA)
        login = TargetLogin(self.login_config, self.new_tsih, max_cmd_window=self.cmd_window)
        if sum(1 for src, _ in self.pending.values() if src == source) >= self.max_pending_per_source:
            self._evict(source)
        if len(self.pending) >= self.max_pending_logins:
            self._evict(None)
        conn_id = next(self._conn_ids)
        with trio.move_on_after(self.login_timeout) as scope:
            self.pending[conn_id] = (source, scope)
            try:
                result = await self._login(stream, reader, login, peer)
            finally:
                self.pending.pop(conn_id, None)
        if scope.cancelled_caught:
            if scope.deadline <= trio.current_time():
                self.stats["login_timeouts"] += 1
                log.info("%s: no login within %g s; closing", peer, self.login_timeout)
            return
        if result is None:
            return
        self.stats["logins"] += 1
        params = result.params
        log.info("%s: login: %s ISID 0x%s TSIH %d, %s session%s; %s", peer, result.initiator_name, result.isid.hex(),
                 result.tsih, result.session_type, f" to {result.target_name}" if result.target_name else "",
                 params.describe())
        reader.header_digest = params.header_digest
        reader.data_digest = params.data_digest
        reader.max_data = params.max_recv_data_segment_length
        with trio.CancelScope() as session_scope:
            nexus = (result.initiator_name, result.isid)
            old = self.by_nexus.get(nexus)
            if old is not None:
                log.info("%s: session reinstatement: the old session of %s ISID 0x%s is closed", peer,
                         result.initiator_name, result.isid.hex())
                old.cancel()  # session reinstatement (RFC 7143 §6.3.5): the old one goes
            self.by_nexus[nexus] = session_scope
            session = TargetSession(self.core, result, window=self.cmd_window)
            try:
                local = stream.socket.getsockname()
                session.portal = f"{local[0]}:{local[1]}"
            except OSError:
                pass
            self.core.sessions.add(session)
            try:
                await self._full_feature(stream, reader, session, peer, source)
            finally:
                session.close()
                if self.by_nexus.get(nexus) is session_scope:
                    del self.by_nexus[nexus]

    async def _login(self, stream: trio.SocketStream, reader: PduReader, login: TargetLogin, peer: str) -> LoginResult | None:
        while True:
            data = await stream.receive_some(RECV_SIZE)
            if not data:
                return None
            reader.feed(data)
            while True:
                try:
                    pdu = reader.next()
                except (PduError, DataDigestError) as e:
                    self.stats["protocol_errors"] += 1
                    log.info("%s: protocol error during login: %s", peer, e)
                    return None
                if pdu is None:
                    break
                rsp, close = login.receive(pdu)
                await stream.send_all(rsp.encode())
                if close:
                    self.stats["login_failures"] += 1
                    status = (rsp.bhs[36] << 8) | rsp.bhs[37]
                    try:
                        name = LoginStatus(status).name
                    except ValueError:
                        name = "UNKNOWN"
                    log.info("%s: login refused for %s: status 0x%04x %s", peer, login.declared.get("InitiatorName", "?"),
                             status, name)
                    return None
                if login.result is not None:
                    return login.result

    async def _full_feature(self, stream: trio.SocketStream, reader: PduReader, session: TargetSession, peer: str,
                            source: str) -> None:
        # The hot loop talks to the (non-blocking) socket directly: try the syscall first and
        # wait for readiness only when it would block; trio's stream methods add two scheduler
        # round trips per call, which at tens of thousands of commands a second is most of the
        # cost. A checkpoint every few rounds keeps other sessions served.
        fd = stream.socket.fileno()
        # One writer at a time (the answers, the pinger). Nearly always free: a flag, and an
        # event only when someone has to wait for it.
        writing = False
        waiting = 0
        writer_done = trio.Event()

        async def send_all(data: bytes) -> None:
            nonlocal writing, waiting, writer_done
            while writing:
                waiting += 1
                try:
                    await writer_done.wait()
                finally:
                    waiting -= 1
            writing = True
            view = memoryview(data)
            try:
                while view:
                    try:
                        view = view[os.write(fd, view):]
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(fd)
            finally:
                writing = False
                if waiting:
                    writer_done.set()
                    writer_done = trio.Event()

        async def receive() -> bytes:
            while True:
                try:
                    return os.read(fd, RECV_SIZE)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)

        stat: ClientStat | None = None
        name = session.nexus.initiator_name
        if not session.discovery:
            stat, name = self.clients.login(source, name)

        def sent(nbytes: int, done: list[float]) -> None:
            if stat is not None:
                stat.bytes_out += nbytes
                if done:
                    stat.answered(name, done, time.perf_counter())

        responses = Responses(send_all, sent)

        async def answer() -> None:
            data = b"".join(session.out)
            session.out.clear()
            done = session.done
            session.done = []
            await responses.put(data, session.sync_luns, done)
            session.sync_luns = set()
        # The PDUs already buffered came with the login's last read.
        session.now = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(responses.run)
            if self.nop_interval > 0:
                nursery.start_soon(self._pinger, session, send_all, nursery.cancel_scope, peer)
            rounds = 0
            while True:
                fatal = False
                while True:
                    try:
                        pdu = reader.next()
                    except DataDigestError as e:
                        session.data_digest_error(e.pdu)
                        continue
                    except PduError as e:
                        # Header digest error or oversized segment: the stream is out of step.
                        self.stats["protocol_errors"] += 1
                        log.info("%s: protocol error: %s; closing the connection", peer, e)
                        if e.bhs:
                            session.reject(e.bhs, e.reason)
                        fatal = True
                        break
                    if pdu is None:
                        break
                    session.receive(pdu)
                    if len(session.done) >= ANSWER_BATCH:
                        await answer()  # the initiator starts on these while we execute the rest
                if session.out:  # every answer of the round in one write
                    await answer()
                if fatal or session.closing:
                    await responses.drained()  # the last answers (a Logout Response) go out first
                    break
                rounds += 1
                if rounds % 16 == 0:
                    await trio.lowlevel.checkpoint()
                data = await receive()
                if not data:
                    log.info("%s: %s ISID 0x%s closed the connection", peer, session.nexus.initiator_name,
                             session.nexus.isid.hex())
                    break
                session.now = time.perf_counter()
                if stat is not None:
                    stat.bytes_in += len(data)
                reader.feed(data)
            nursery.cancel_scope.cancel()

    async def _pinger(self, session: TargetSession, send: Callable[[bytes], Awaitable[None]], scope: trio.CancelScope,
                      peer: str) -> None:
        """Ping an idle initiator; close the connection when it stops answering. `send` is the
        main loop's own (locked) writer."""
        while True:
            await trio.sleep(self.nop_interval)
            if session.nops_unanswered >= NOP_MISSES:
                log.info("%s: the initiator stopped answering NOP-In; closing the connection", peer)
                scope.cancel()
                return
            # Send only the ping: answers queued in session.out may be waiting for an fsync.
            saved, session.out = session.out, []
            session.nop_in_ping()
            ping, session.out = b"".join(session.out), saved
            try:
                await send(ping)
            except CONNECTION_ERRORS:
                scope.cancel()  # the main loop meets the same error, or already has
                return


class Responses:
    """A connection's answers, sent in the order they were made (StatSN order).

    An answer that must wait for an fsync (FUA, SYNCHRONIZE CACHE) holds back everything made
    after it. One fsync covers every write executed before it started, so while it runs (in a
    worker thread) the connection goes on receiving and executing commands, and the next fsync
    covers them all: group commit. Answers that need nothing, with nothing ahead of them, go out
    at once. `sent(nbytes, done)` hears of every write once it is handed to the socket, with the
    arrival times of the commands it answered."""

    def __init__(self, send: Callable[[bytes], Awaitable[None]],
                 sent: Callable[[int, list[float]], None] | None = None) -> None:
        self.send = send
        self.sent = sent or _ignore
        self.queue: deque[tuple[bytes, set[DiskLun], list[float]]] = deque()
        self.busy = False
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._idle.set()

    async def put(self, data: bytes, luns: set[DiskLun], done: list[float] | None = None) -> None:
        done = done if done is not None else []
        if not self.queue and not self.busy:
            if not luns:
                await self.send(data)
                self.sent(len(data), done)
                return
            if all(lun.fast_sync for lun in luns):
                for lun in luns:
                    lun.fsync()  # microseconds: cheaper than a worker thread
                await self.send(data)
                self.sent(len(data), done)
                return
        self.queue.append((data, luns, done))
        if self._idle.is_set():
            self._idle = trio.Event()
        self._wake.set()

    async def drained(self) -> None:
        await self._idle.wait()

    async def run(self) -> None:
        while True:
            if not self.queue:
                self.busy = False
                self._idle.set()
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            self.busy = True
            batch = list(self.queue)
            self.queue.clear()
            for lun in set().union(*(luns for _, luns, _ in batch)):
                if lun.fast_sync:
                    lun.fsync()
                else:
                    await trio.to_thread.run_sync(lun.fsync)
            data = b"".join(data for data, _, _ in batch)
            await self.send(data)
            self.sent(len(data), [t for _, _, done in batch for t in done])


def _ignore(nbytes: int, done: list[float]) -> None:
    """No one is counting."""


def _connection_error(e: BaseException) -> str | None:
    """What ended a connection the peer closed or reset (also inside a nursery's exception group),
    as one line; None if `e` is anything else."""
    if isinstance(e, BaseExceptionGroup):
        reasons = [_connection_error(x) for x in e.exceptions]
        return None if not reasons or None in reasons else reasons[0]
    if isinstance(e, CONNECTION_ERRORS):
        cause = e.__cause__ if isinstance(e, (trio.BrokenResourceError, trio.ClosedResourceError)) and e.__cause__ else e
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
        return str(cause) or type(cause).__name__
    return None
