"""The iSCSI initiator's trio driver: `Initiator` (one session with one LUN) and `discover`.

Thin on purpose: login is `InitiatorLogin`, a connection's full feature phase is
`InitiatorConnection`, and what outlives a connection (task order, retries, session recovery,
timeouts) is `InitiatorSession`. The driver owns the stream, the clock and the waiting: one task
receives, one sends, one runs the session's timers, and one supervises the connection, logging in
again after a loss until the session's `replacement_timeout` runs out.

    async with Initiator(lambda: trio.open_tcp_stream("127.0.0.1", 3260), "iqn...:disk") as ini:
        await ini.write(0, b"x" * 4096, fua=True)
        data = await ini.read(0, 8)

The connect factory may return any `trio.abc.Stream` (the emulated host's streams are not
sockets); every timer runs on trio's clock, so an emulated `trio.abc.Clock` drives them all.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from . import scsi
from .initiator_conn import InitiatorConnection, ProtocolViolation
from .initiator_session import REPLACEMENT_TIMEOUT, InitiatorSession, SessionState
from .initiator_task import CommandResult, ISCSIError, ScsiError, SessionRecoveryTimeout, Task, TaskKind
from .keys import SessionParams
from .login import InitiatorConfig, InitiatorLogin, LoginError
from .pdu import BHS_LEN, RESERVED_TAG, DataDigestError, Pdu, PduError, PduReader, decode_lun, encode_text, parse_text
from .sense import Status

__all__ = [
    "CommandResult", "ConnectFactory", "ISCSIError", "Initiator", "RequestBuffers", "ScsiError",
    "SessionRecoveryTimeout", "discover",
]

LOGIN_TIMEOUT = 15.0  # open-iscsi's node.conn[0].timeo.login_timeout
RECV_SIZE = 262144

ConnectFactory = Callable[[], Awaitable[trio.abc.Stream]]
# What can end a connection, or a login attempt, without being a bug of ours.
CONNECTION_ERRORS = (OSError, ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError, PduError,
                     ProtocolViolation, LoginError, ISCSIError, trio.TooSlowError)


class RequestBuffers(Protocol):
    """Charged memory for each request (command PDU + data), held until its response."""

    async def alloc(self, nbytes: int) -> object: ...

    def free(self, token: object) -> None: ...


class NoBuffers:
    async def alloc(self, nbytes: int) -> object:
        return None

    def free(self, token: object) -> None:
        return None


class Initiator:
    """A session with one target LUN over a pluggable stream, with session recovery.

    connect: async factory returning a fresh `trio.abc.Stream`, called for every connection.
    on_connect: called with the new stream after every successful login (the first one and each
      one after a loss), before any command is reissued on it: the place to restore whatever a
      new connection needs (socket marking, memory reserves).
    buffers: optional RequestBuffers, alloc'ed per command and freed when it finishes.
    command_timeout: seconds before an unanswered command makes the session drop the connection
      and recover (None: wait forever).
    replacement_timeout: seconds a lost session keeps trying to log in again before every
      outstanding command fails with SessionRecoveryTimeout (open-iscsi's default: 120).
    """

    def __init__(
        self,
        connect: ConnectFactory,
        target_name: str,
        *,
        lun: int = 0,
        initiator_name: str = "iqn.2024-01.org.netswap:initiator",
        header_digest: bool = False,
        data_digest: bool = False,
        chap: tuple[str, str] | None = None,
        buffers: RequestBuffers | None = None,
        max_recv_data_segment_length: int = 262144,
        reconnect_delay: float = 0.1,
        command_timeout: float | None = 30.0,
        replacement_timeout: float = REPLACEMENT_TIMEOUT,
        login_timeout: float = LOGIN_TIMEOUT,
        isid: bytes | None = None,
        on_connect: Callable[[trio.abc.Stream], object] | None = None,
    ) -> None:
        self.connect = connect
        self.lun = lun
        self.config = InitiatorConfig(
            initiator_name=initiator_name,
            target_name=target_name,
            chap=chap,
            header_digest=header_digest,
            data_digest=data_digest,
            max_recv_data_segment_length=max_recv_data_segment_length,
        )
        self.buffers: RequestBuffers = buffers or NoBuffers()
        self.command_timeout = command_timeout
        self.login_timeout = login_timeout
        self.on_connect = on_connect
        self.session = InitiatorSession(replacement_timeout=replacement_timeout, command_timeout=command_timeout,
                                        reconnect_backoff=(reconnect_delay, max(1.0, reconnect_delay)))
        # ISID: type 0x80 (random), kept for the life of this object so relogins reinstate.
        self.isid = isid or bytes((0x80,)) + os.urandom(5)
        self.stream: trio.abc.Stream | None = None
        self.block_size = 512
        self.nblocks = 0
        self._nursery: trio.Nursery | None = None
        self._stack = contextlib.AsyncExitStack()  # owns the nursery of the background tasks
        self._waiters: dict[Task, trio.Event] = {}
        self._out: list[bytes] = []  # replies the receiver produced, for the sender
        self._send_wake = trio.Event()
        self._timer_wake = trio.Event()
        self._timer_at = math.inf
        self._conn_scope: trio.CancelScope | None = None
        self._closing = False

    # --- what the emulated host reads -------------------------------------------------------------

    @property
    def params(self) -> SessionParams | None:
        conn = self.session.conn
        return conn.params if conn is not None else None

    @property
    def reconnects(self) -> int:
        """Session recoveries that succeeded (logins after a lost connection)."""
        return self.session.stats["reconnects"]

    @property
    def reissued(self) -> int:
        """Commands sent again after a lost connection."""
        return self.session.stats["reissued"]

    @property
    def stats(self) -> dict[str, int]:
        return dict(self.session.stats)

    # --- lifecycle --------------------------------------------------------------------------------

    async def __aenter__(self) -> Initiator:
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        try:
            await self.login()
        except BaseException:
            self._nursery.cancel_scope.cancel()
            await self._close_stream()
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> bool | None:
        if exc[0] is None and self.session.state is SessionState.LOGGED_IN:
            with trio.move_on_after(5):
                await self.logout()
        self._closing = True
        self.session.terminate(ISCSIError("the initiator was closed"))
        self._after_session_change()
        await self._close_stream()
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        return await self._stack.__aexit__(*exc)  # type: ignore[arg-type]

    async def login(self) -> None:
        """Connect and log in (normal session), then probe the LUN's capacity."""
        if self._nursery is None:
            raise RuntimeError("use `async with Initiator(...)` (it owns the receive task)")
        try:
            with trio.fail_after(self.login_timeout):
                stream, reader = await self._connect_and_login()
        except trio.TooSlowError:
            raise ISCSIError(f"no login to {self.config.target_name} within {self.login_timeout:g} s") from None
        self._nursery.start_soon(self._supervise, stream, reader)
        self._nursery.start_soon(self._timers)
        cap = await self.command(scsi.cdb_read_capacity16(32), read_len=32, check=False)
        if cap.status == Status.GOOD and len(cap.data) >= 12:
            last, self.block_size = struct.unpack_from(">QI", cap.data)
        else:
            cap = await self.command(scsi.cdb_read_capacity10(), read_len=8)
            last, self.block_size = struct.unpack_from(">II", cap.data)
        self.nblocks = last + 1

    async def logout(self) -> None:
        """Close the session (Logout reason 0) and the connection."""
        if self.session.state is not SessionState.LOGGED_IN:
            return
        self._closing = True  # the target closes the connection after answering: no recovery
        with trio.move_on_after(self.command_timeout or 30):
            try:
                await self._issue(Task(TaskKind.LOGOUT, immediate=True))
            except ISCSIError:
                pass
        self.session.terminate(ISCSIError("logged out"))  # later commands fail, not hang
        self._after_session_change()
        await self._close_stream()

    async def _close_stream(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _connect_and_login(self) -> tuple[trio.abc.Stream, PduReader]:
        """One connection, logged in, the session's current one (raises what went wrong)."""
        stream = await self.connect()
        try:
            conn, reader = await _login(stream, self.config, isid=self.isid, conn_id=self.session.new_connection_id())
            if self.on_connect is not None:
                self.on_connect(stream)
            self.session.connection_up(conn, trio.current_time())
            self.stream = stream
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        self._after_session_change()
        return stream, reader

    # --- the connection supervisor ----------------------------------------------------------------

    async def _supervise(self, stream: trio.abc.Stream, reader: PduReader) -> None:
        """Serve the connection until it ends; then recover the session, and serve the next one."""
        session = self.session
        while True:
            cause = await self._serve(stream, reader)
            await self._close_stream()
            if self._closing or session.state is not SessionState.LOGGED_IN:
                return
            session.connection_lost(cause, trio.current_time())
            self._after_session_change()
            got = await self._recover()
            if got is None:
                return
            stream, reader = got

    async def _serve(self, stream: trio.abc.Stream, reader: PduReader) -> str:
        """Run the receiver and the sender of one connection; returns why it ended."""
        cause = "connection closed"

        async def run(part: Callable[[trio.abc.Stream, PduReader], Awaitable[None]], scope: trio.CancelScope) -> None:
            nonlocal cause
            try:
                await part(stream, reader)
            except CONNECTION_ERRORS as e:
                cause = _describe(e)
            except DataDigestError as e:
                cause = str(e)
            scope.cancel()

        async with trio.open_nursery() as n:
            self._conn_scope = n.cancel_scope
            n.start_soon(run, self._receiver, n.cancel_scope)
            n.start_soon(run, self._sender, n.cancel_scope)
        self._conn_scope = None
        drop = self.session.drop_reason
        return drop if drop is not None else cause

    async def _recover(self) -> tuple[trio.abc.Stream, PduReader] | None:
        """Log in again until it works or the session's replacement_timeout ends it."""
        session = self.session
        while session.state is SessionState.RECOVERING:
            deadline = session.recovery_deadline
            assert deadline is not None
            with trio.move_on_at(deadline):
                await trio.sleep(session.reconnect_delay())
                try:
                    with trio.fail_after(self.login_timeout):
                        return await self._connect_and_login()
                except Exception as e:  # any failure to connect or log in is retried until the deadline
                    session.login_failed(_describe(e))
            if trio.current_time() >= deadline:
                session.handle_timer(trio.current_time())
                self._after_session_change()
        return None

    async def _receiver(self, stream: trio.abc.Stream, reader: PduReader) -> None:
        session = self.session
        while True:
            now = trio.current_time()
            while (pdu := reader.next()) is not None:
                session.receive(pdu, now, self._out)
            self._after_session_change()
            data = await stream.receive_some(RECV_SIZE)
            if not data:
                raise ConnectionError("target closed the connection")
            reader.feed(data)

    async def _sender(self, stream: trio.abc.Stream, reader: PduReader) -> None:
        """One writer per connection: whatever accumulated while it sent goes out in one write, so
        with many commands in flight there are far fewer syscalls than commands."""
        session = self.session
        while True:
            out = self._out
            session.flush(trio.current_time(), out)
            if not out:
                self._send_wake = trio.Event()
                await self._send_wake.wait()
                continue
            self._out = []
            self._poke_timer()
            await stream.send_all(b"".join(out))

    # --- timers and wake-ups ----------------------------------------------------------------------

    async def _timers(self) -> None:
        """Run the session's timers (busy retries, command timeout, replacement timeout)."""
        session = self.session
        while True:
            at = session.get_timer()
            self._timer_at = math.inf if at is None else at
            self._timer_wake = trio.Event()
            with trio.move_on_at(self._timer_at):
                await self._timer_wake.wait()
                continue
            session.handle_timer(trio.current_time())
            if session.drop_reason is not None and self._conn_scope is not None:
                self._conn_scope.cancel()  # the supervisor recovers the session
            self._after_session_change()

    def _poke_timer(self) -> None:
        at = self.session.get_timer()
        if at is not None and at < self._timer_at:
            self._timer_wake.set()

    def _after_session_change(self) -> None:
        """Wake whoever the session's last step concerns: finished tasks' callers, the sender."""
        session = self.session
        if session.finished:
            for task in session.take_finished():
                ev = self._waiters.get(task)
                if ev is not None:
                    ev.set()
        if self._out or session.sendable:
            self._send_wake.set()
        if session.state is not SessionState.LOGGED_IN or session.delayed:
            self._poke_timer()

    # --- commands ---------------------------------------------------------------------------------

    async def _issue(self, task: Task) -> Task:
        session = self.session
        if session.state is SessionState.TERMINATED:
            assert session.error is not None
            raise session.error
        nbytes = BHS_LEN + (len(task.data_out) if task.data_out is not None else 0) + task.read_len
        token = await self.buffers.alloc(nbytes)
        try:
            done = self._waiters[task] = trio.Event()
            session.issue(task)
            self._after_session_change()
            await done.wait()
        finally:
            self._waiters.pop(task, None)
            self.buffers.free(token)
        if task.error is not None:
            raise task.error
        return task

    async def command(self, cdb: bytes, *, data_out: bytes | bytearray | memoryview | None = None, read_len: int = 0,
                      check: bool = True) -> CommandResult:
        """Run one SCSI command on this LUN; raises ScsiError unless GOOD (when `check`). BUSY,
        TASK SET FULL and UNIT ATTENTION answers are retried by the session first."""
        mv = memoryview(data_out) if data_out is not None else None
        task = await self._issue(Task(TaskKind.SCSI, self.lun, bytes(cdb), mv, read_len))
        res = task.result
        assert res is not None
        if check and res.status != Status.GOOD:
            raise ScsiError(task.cdb, res.status, res.sense)
        return res

    async def read(self, lba: int, nblocks: int) -> bytes:
        n = nblocks * self.block_size
        res = await self.command(scsi.cdb_read(lba, nblocks), read_len=n)
        if len(res.data) != n:
            raise ISCSIError(f"READ returned {len(res.data)} of {n} bytes")
        return bytes(res.data)

    async def write(self, lba: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        if len(data) % self.block_size:
            raise ValueError(f"write of {len(data)} bytes is not a multiple of the block size {self.block_size}")
        await self.command(scsi.cdb_write(lba, len(data) // self.block_size, fua=fua), data_out=data)

    async def synchronize_cache(self, lba: int = 0, nblocks: int = 0) -> None:
        await self.command(scsi.cdb_synchronize_cache(lba, nblocks))

    async def read_capacity(self) -> tuple[int, int]:
        res = await self.command(scsi.cdb_read_capacity16(32), read_len=32)
        last, bs = struct.unpack_from(">QI", res.data)
        return last + 1, bs

    async def inquiry(self, *, evpd: bool = False, page: int = 0, alloc: int = 255) -> bytes:
        return bytes((await self.command(scsi.cdb_inquiry(alloc, evpd, page), read_len=alloc)).data)

    async def test_unit_ready(self) -> None:
        await self.command(scsi.cdb_test_unit_ready())

    async def report_luns(self) -> list[int]:
        data = (await self.command(scsi.cdb_report_luns(4096), read_len=4096)).data
        n = struct.unpack_from(">I", data)[0]
        return [decode_lun(data[8 + i : 16 + i]) for i in range(0, min(n, len(data) - 8), 8)]

    async def nop(self, data: bytes = b"") -> bytes:
        """NOP-Out ping; returns the echoed data."""
        task = await self._issue(Task(TaskKind.NOP, self.lun, immediate=True, payload=data))
        assert isinstance(task.response, (bytes, bytearray, memoryview))
        return bytes(task.response)

    async def task_management(self, function: int, ref_itt: int = RESERVED_TAG, ref_cmd_sn: int = 0) -> int:
        """Task Management Function request; returns the TMF response code."""
        task = await self._issue(Task(TaskKind.TMF, self.lun, immediate=True, tmf=(function, ref_itt, ref_cmd_sn)))
        assert isinstance(task.response, int)
        return task.response


def _describe(e: BaseException) -> str:
    if isinstance(e, trio.TooSlowError):
        return "timed out"
    if isinstance(e, (trio.BrokenResourceError, trio.ClosedResourceError)) and e.__cause__ is not None:
        e = e.__cause__
    text = str(e) or type(e).__name__
    return text if isinstance(e, (ISCSIError, LoginError, ProtocolViolation, PduError)) else f"{type(e).__name__}: {text}"


async def _receive_pdu(stream: trio.abc.Stream, reader: PduReader, what: str) -> Pdu:
    while (pdu := reader.next()) is None:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError(f"target closed the connection during {what}")
        reader.feed(data)
    return pdu


async def _login(stream: trio.abc.Stream, config: InitiatorConfig, *, isid: bytes, tsih: int = 0,
                 conn_id: int = 1) -> tuple[InitiatorConnection, PduReader]:
    """Run the login phase on `stream`; returns the full-feature connection and its framer."""
    reader = PduReader(max_data=max(8192, config.max_recv_data_segment_length))
    login = InitiatorLogin(config, isid=isid, tsih=tsih, cmd_sn=1, exp_stat_sn=0)
    req: Pdu | None = login.start()
    while req is not None:
        await stream.send_all(req.encode())
        req = login.receive(await _receive_pdu(stream, reader, "login"))
    params = login.params
    reader.header_digest = params.header_digest
    reader.data_digest = params.data_digest
    reader.max_data = params.max_recv_data_segment_length
    conn = InitiatorConnection(params, cmd_sn=login.cmd_sn, exp_stat_sn=login.exp_stat_sn, exp_cmd_sn=login.exp_cmd_sn,
                               max_cmd_sn=login.max_cmd_sn, conn_id=conn_id)
    return conn, reader


async def discover(connect: ConnectFactory, *, initiator_name: str = "iqn.2024-01.org.netswap:initiator",
                   timeout: float = 30.0) -> list[tuple[str, str]]:
    """A discovery session: SendTargets=All -> [(TargetName, TargetAddress), ...]."""
    stream = await connect()
    try:
        with trio.fail_after(timeout):
            config = InitiatorConfig(initiator_name=initiator_name, session_type="Discovery")
            conn, reader = await _login(stream, config, isid=bytes((0x80,)) + os.urandom(5))
            task = Task(TaskKind.TEXT, payload=encode_text([("SendTargets", "All")]))
            out: list[bytes] = []
            conn.submit(task, out)
            await stream.send_all(b"".join(out))
            while task not in conn.completed:
                replies = conn.receive(await _receive_pdu(stream, reader, "discovery"))
                if replies:
                    await stream.send_all(b"".join(replies))
        if task.error:
            raise task.error
        found: list[tuple[str, str]] = []
        name = None
        for key, value in parse_text(task.response):  # type: ignore[arg-type]
            if key == "TargetName":
                name = value
            elif key == "TargetAddress" and name is not None:
                found.append((name, value))
        out = []
        conn.submit(Task(TaskKind.LOGOUT, immediate=True), out)
        with trio.move_on_after(5):
            await stream.send_all(b"".join(out))
        return found
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
