"""The iSCSI target's trio driver: accept connections, run login, then pump PDUs through a session.

Thin on purpose: framing is `PduReader`, login is `TargetLogin`, the full feature phase is
`TargetSession`. Per connection the loop is: drain every complete PDU from what arrived, fsync the
LUNs whose answers need it (off the event loop), send all answers in one write, receive again.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket

import trio

from .keys import TargetPrefs
from .login import LoginConfig, LoginResult, TargetLogin
from .lun import DiskLun
from .pdu import DataDigestError, PduError, PduReader
from .session import CMD_WINDOW, TargetCore, TargetSession

log = logging.getLogger("netswap.iscsi.target")

LOGIN_TIMEOUT = 30.0
LOGIN_MAX_DATA = 8192  # login PDUs carry at most 8192 bytes of text (RFC 7143 §6.1)
RECV_SIZE = 256 << 10
MAX_CONNECTIONS = 64
NOP_MISSES = 3


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
        self._tsih = itertools.count(1)
        self.connections = 0
        self.by_nexus: dict[tuple[str, bytes], trio.CancelScope] = {}
        self.stats = {"connections": 0, "logins": 0, "login_failures": 0, "protocol_errors": 0, "handler_errors": 0}

    def new_tsih(self) -> int:
        t = next(self._tsih) & 0xFFFF
        return t or self.new_tsih()

    async def serve(self, host: str = "127.0.0.1", port: int = 3260, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        sockname = listeners[0].socket.getsockname()
        self.core.portal = f"{sockname[0]}:{sockname[1]}"
        async with trio.open_nursery() as nursery:
            task_status.started(listeners)
            await trio.serve_listeners(self.handle, listeners, handler_nursery=nursery)

    async def handle(self, stream: trio.SocketStream) -> None:
        if self.connections >= self.max_connections:
            await stream.aclose()
            return
        self.connections += 1
        self.stats["connections"] += 1
        try:
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await self._connection(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the peer went away (reset, closed): that connection ends, nothing else
        except Exception:
            # A bug provoked by one peer's input costs that connection only, never the target.
            self.stats["handler_errors"] += 1
            log.exception("connection handler failed; closing that connection")
        finally:
            self.connections -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _connection(self, stream: trio.SocketStream) -> None:
        reader = PduReader(max_data=LOGIN_MAX_DATA)
        login = TargetLogin(self.login_config, self.new_tsih, max_cmd_window=self.cmd_window)
        result = await self._login(stream, reader, login)
        if result is None:
            return
        self.stats["logins"] += 1
        params = result.params
        reader.header_digest = params.header_digest
        reader.data_digest = params.data_digest
        reader.max_data = params.max_recv_data_segment_length
        with trio.CancelScope() as scope:
            nexus = (result.initiator_name, result.isid)
            old = self.by_nexus.get(nexus)
            if old is not None:
                old.cancel()  # session reinstatement (RFC 7143 §6.3.5): the old one goes
            self.by_nexus[nexus] = scope
            session = TargetSession(self.core, result, window=self.cmd_window)
            try:
                local = stream.socket.getsockname()
                session.portal = f"{local[0]}:{local[1]}"
            except OSError:
                pass
            self.core.sessions.add(session)
            try:
                await self._full_feature(stream, reader, session)
            finally:
                session.close()
                if self.by_nexus.get(nexus) is scope:
                    del self.by_nexus[nexus]

    async def _login(self, stream: trio.SocketStream, reader: PduReader, login: TargetLogin) -> LoginResult | None:
        with trio.move_on_after(LOGIN_TIMEOUT):
            while True:
                data = await stream.receive_some(RECV_SIZE)
                if not data:
                    return None
                reader.feed(data)
                while True:
                    try:
                        pdu = reader.next()
                    except (PduError, DataDigestError):
                        self.stats["protocol_errors"] += 1
                        return None
                    if pdu is None:
                        break
                    rsp, close = login.receive(pdu)
                    await stream.send_all(rsp.encode())
                    if close:
                        self.stats["login_failures"] += 1
                        return None
                    if login.result is not None:
                        return login.result
        return None

    async def _full_feature(self, stream: trio.SocketStream, reader: PduReader, session: TargetSession) -> None:
        send_lock = trio.Lock()
        # The hot loop talks to the (non-blocking) socket directly: try the syscall first and
        # wait for readiness only when it would block (DESIGN §11); trio's stream methods add
        # two scheduler round trips per call, which at tens of thousands of commands a second
        # is most of the cost. A checkpoint every few rounds keeps other sessions served.
        fd = stream.socket.fileno()

        async def send_all(data: bytes) -> None:
            view = memoryview(data)
            async with send_lock:
                while view:
                    try:
                        view = view[os.write(fd, view):]
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(fd)

        async def receive() -> bytes:
            while True:
                try:
                    return os.read(fd, RECV_SIZE)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)

        async def flush() -> None:
            if session.sync_luns:
                luns = list(session.sync_luns)
                session.sync_luns.clear()
                for lun in luns:
                    await trio.to_thread.run_sync(lun.fsync)
            if session.out:
                data = b"".join(session.out)
                session.out.clear()
                await send_all(data)

        async with trio.open_nursery() as nursery:
            if self.nop_interval > 0:
                nursery.start_soon(self._pinger, session, stream, send_lock, nursery.cancel_scope)
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
                        if e.bhs:
                            session.reject(e.bhs, e.reason)
                        fatal = True
                        break
                    if pdu is None:
                        break
                    session.receive(pdu)
                await flush()
                if fatal or session.closing:
                    break
                rounds += 1
                if rounds % 16 == 0:
                    await trio.lowlevel.checkpoint()
                data = await receive()
                if not data:
                    break
                reader.feed(data)
            nursery.cancel_scope.cancel()

    async def _pinger(self, session: TargetSession, stream: trio.SocketStream, send_lock: trio.Lock, scope: trio.CancelScope) -> None:
        while True:
            await trio.sleep(self.nop_interval)
            if session.nops_unanswered >= NOP_MISSES:
                log.info("initiator stopped answering NOP-In; closing the connection")
                scope.cancel()
                return
            # Send only the ping: answers queued in session.out may be waiting for an fsync.
            saved, session.out = session.out, []
            session.nop_in_ping()
            ping, session.out = b"".join(session.out), saved
            async with send_lock:
                await stream.send_all(ping)  # not concurrent with the main loop's writes: the lock

