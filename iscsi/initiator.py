"""The iSCSI initiator: a sans-IO session core (`InitiatorCore`) and a thin trio driver (`Initiator`).

The driver takes a connect factory (any `trio.abc.Stream`: a plain trio socket, or the emulated
host's EmuStream), logs in, keeps several commands in flight inside the target's CmdSN window,
answers NOP-In pings, and after a lost connection logs in again (session reinstatement, same ISID)
and reissues every outstanding command.

    async with Initiator(lambda: trio.open_tcp_stream("127.0.0.1", 3260), "iqn...:disk") as ini:
        await ini.write(0, b"x" * 4096, fua=True)
        data = await ini.read(0, 8)
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from . import scsi
from .digest import digest
from .keys import SessionParams
from .login import InitiatorConfig, InitiatorLogin, LoginError
from .pdu import (
    F_FINAL,
    F_OVERFLOW,
    F_READ,
    F_STATUS,
    F_UNDERFLOW,
    F_WRITE,
    RESERVED_TAG,
    DataDigestError,
    Op,
    Pdu,
    PduError,
    PduReader,
    RejectReason,
    encode_lun,
    encode_text,
    parse_text,
)
from .sense import Sense, SenseKey, Status

log = logging.getLogger("netswap.iscsi.initiator")

MASK = 0xFFFFFFFF
_BHS = struct.Struct(">BBBBI8sIIIIIIII")
_CMD = struct.Struct(">BBBBI8sIIII16s")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")
ATTR_SIMPLE = 1
BUSY_RETRIES = 20  # BUSY / TASK SET FULL answers retried with backoff before giving up


class ISCSIError(Exception):
    """A protocol-level failure: login refused, PDU rejected, connection lost for good."""


class ScsiError(Exception):
    """A SCSI command finished with a status other than GOOD."""

    def __init__(self, cdb: bytes, status: int, sense: Sense | None) -> None:
        try:
            name = Status(status).name
        except ValueError:
            name = f"0x{status:02x}"
        super().__init__(f"SCSI opcode 0x{cdb[0]:02x}: {name}" + (f", {sense}" if sense else ""))
        self.status = status
        self.sense = sense


class RequestBuffers(Protocol):
    """Charged memory for each request (command PDU + data), held until its response."""

    async def alloc(self, nbytes: int) -> object: ...

    def free(self, token: object) -> None: ...


class NoBuffers:
    async def alloc(self, nbytes: int) -> object:
        return None

    def free(self, token: object) -> None:
        return None


def sn_gt(a: int, b: int) -> bool:
    return a != b and ((a - b) & MASK) < 0x80000000


@dataclass
class CommandResult:
    status: int
    data: bytes = b""
    sense: Sense | None = None
    residual: int = 0
    overflow: bool = False
    underflow: bool = False


class Task:
    """One outstanding request: a SCSI command, a NOP-Out ping, a TMF, a Text or a Logout."""

    __slots__ = ("kind", "itt", "cmd_sn", "lun", "cdb", "data_out", "read_len", "chunks", "received", "exp_data_sn",
                 "result", "error", "done", "token", "immediate", "payload", "response", "seq", "gen", "sent_at")

    def __init__(self, kind: str, lun: int = 0, cdb: bytes = b"", data_out: memoryview | None = None, read_len: int = 0) -> None:
        self.kind = kind
        self.itt = 0
        self.cmd_sn = 0
        self.lun = lun
        self.cdb = cdb
        self.data_out = data_out
        self.read_len = read_len
        self.chunks: bytearray | bytes | None = None
        self.received = 0
        self.exp_data_sn = 0
        self.result: CommandResult | None = None
        self.error: BaseException | None = None
        self.done: trio.Event | None = None
        self.token: object = None
        self.immediate = False
        self.payload: bytes = b""  # NOP/Text/TMF request data or fields
        self.response: object = None
        self.seq = 0
        self.gen = 0  # connection generation it was last sent on (0: not yet)
        self.sent_at = 0.0


class ProtocolViolation(Exception):
    """The target broke the protocol: the connection must be dropped (ErrorRecoveryLevel 0)."""


class InitiatorCore:
    """Sans-IO full feature phase of one connection. `submit(task)` gives bytes to send;
    `receive(pdu)` gives bytes to send back (Data-Out, NOP-Out answers) and fills `completed`."""

    def __init__(self, params: SessionParams, *, cmd_sn: int, exp_stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int) -> None:
        self.params = params
        self.hd = params.header_digest
        self.dd = params.data_digest
        self.cmd_sn = cmd_sn
        self.exp_stat_sn = exp_stat_sn
        self.exp_cmd_sn = exp_cmd_sn
        self.max_cmd_sn = max_cmd_sn
        self.tasks: dict[int, Task] = {}
        self.next_itt = 1
        self.completed: list[Task] = []
        self.async_events: list[int] = []
        self.text_acc = bytearray()

    # --- sending ----------------------------------------------------------------------------------

    def window_open(self) -> bool:
        return not sn_gt(self.cmd_sn, self.max_cmd_sn)

    def _frame(self, out: list[bytes], bhs: bytes, data: bytes | memoryview = b"") -> None:
        out.append(bhs)
        if self.hd:
            out.append(digest(bhs))
        if data:
            pad = _PAD[len(data) & 3]
            if pad:
                data = bytes(data) + pad
            out.append(data)  # type: ignore[arg-type]
            if self.dd:
                out.append(digest(data))

    def _alloc_itt(self, task: Task) -> None:
        itt = self.next_itt
        while itt in self.tasks or itt == RESERVED_TAG:
            itt = (itt + 1) & MASK
        self.next_itt = (itt + 1) & MASK
        task.itt = itt
        self.tasks[itt] = task

    def submit(self, task: Task) -> list[bytes]:
        """Assign ITT and CmdSN and encode the request (plus immediate/unsolicited data)."""
        self._alloc_itt(task)
        task.cmd_sn = self.cmd_sn
        task.exp_data_sn = 0
        task.received = 0
        task.chunks = None
        if not task.immediate:
            self.cmd_sn = (self.cmd_sn + 1) & MASK
        out: list[bytes] = []
        lun = encode_lun(task.lun)
        if task.kind == "scsi":
            self._scsi_command(task, lun, out)
        elif task.kind == "nop":
            data = task.payload
            self._frame(out, _BHS.pack(Op.NOP_OUT | (0x40 if task.immediate else 0), F_FINAL, 0, 0, len(data), lun, task.itt, RESERVED_TAG, task.cmd_sn, self.exp_stat_sn, 0, 0, 0, 0), data)
        elif task.kind == "tmf":
            function, rtt, ref_cmd_sn = task.response  # type: ignore[misc]
            self._frame(out, _BHS.pack(Op.TASK_MGMT_REQ | 0x40, F_FINAL | function, 0, 0, 0, lun, task.itt, rtt, task.cmd_sn, self.exp_stat_sn, ref_cmd_sn, 0, 0, 0))
        elif task.kind == "text":
            data = task.payload
            self._frame(out, _BHS.pack(Op.TEXT_REQ, F_FINAL, 0, 0, len(data), bytes(8), task.itt, RESERVED_TAG, task.cmd_sn, self.exp_stat_sn, 0, 0, 0, 0), data)
        elif task.kind == "logout":
            self._frame(out, _BHS.pack(Op.LOGOUT_REQ | 0x40, F_FINAL | 0, 0, 0, 0, bytes(8), task.itt, 0, task.cmd_sn, self.exp_stat_sn, 0, 0, 0, 0))
        else:
            raise ValueError(task.kind)
        return out

    def _scsi_command(self, task: Task, lun: bytes, out: list[bytes]) -> None:
        p = self.params
        data = task.data_out
        edtl = len(data) if data is not None else task.read_len
        flags = F_FINAL | ATTR_SIMPLE
        if data is not None and len(data):
            flags |= F_WRITE
        elif task.read_len:
            flags |= F_READ
        imm = b""
        unsolicited_end = 0
        if data is not None and len(data):
            first = min(len(data), p.first_burst_length)
            if p.immediate_data:
                imm = data[: min(first, p.peer_max_recv_data_segment_length)]
            unsolicited_end = first if not p.initial_r2t else len(imm)
            if unsolicited_end > len(imm):
                flags &= ~F_FINAL  # unsolicited Data-Out follows
        cdb = task.cdb.ljust(16, b"\0")
        self._frame(out, _CMD.pack(Op.SCSI_CMD | (0x40 if task.immediate else 0), flags, 0, 0, len(imm), lun, task.itt, edtl, task.cmd_sn, self.exp_stat_sn, cdb), imm)
        if unsolicited_end > len(imm):
            self._data_out(out, task, lun, RESERVED_TAG, len(imm), unsolicited_end - len(imm))

    def _data_out(self, out: list[bytes], task: Task, lun: bytes, ttt: int, offset: int, length: int) -> None:
        data = task.data_out
        assert data is not None
        mrdsl = self.params.peer_max_recv_data_segment_length
        end = offset + length
        sn = 0
        while offset < end:
            n = min(mrdsl, end - offset)
            last = offset + n >= end
            self._frame(out, _BHS.pack(Op.DATA_OUT, F_FINAL if last else 0, 0, 0, n, lun, task.itt, ttt, 0, self.exp_stat_sn, 0, sn, offset, 0), data[offset : offset + n])
            offset += n
            sn += 1

    # --- receiving --------------------------------------------------------------------------------

    def receive(self, pdu: Pdu) -> list[bytes]:
        bhs = pdu.bhs
        op = bhs[0] & 0x3F
        _, flags, b2, b3, _, _, itt, w20, stat_sn, exp_cmd_sn, max_cmd_sn, w36, w40, w44 = _BHS.unpack(bhs)
        if op != Op.DATA_IN or flags & F_STATUS:
            if op not in (Op.R2T, Op.ASYNC_MSG) and not (op == Op.NOP_IN and itt == RESERVED_TAG):
                self.exp_stat_sn = (stat_sn + 1) & MASK
        if op != Op.LOGIN_RSP and not sn_gt(exp_cmd_sn, (max_cmd_sn + 1) & MASK):
            if sn_gt(max_cmd_sn, self.max_cmd_sn):
                self.max_cmd_sn = max_cmd_sn
            if sn_gt(exp_cmd_sn, self.exp_cmd_sn):
                self.exp_cmd_sn = exp_cmd_sn
        out: list[bytes] = []
        if op == Op.DATA_IN:
            task = self.tasks.get(itt)
            if task is None:
                raise ProtocolViolation(f"Data-In for unknown ITT 0x{itt:x}")
            if w36 != task.exp_data_sn:
                raise ProtocolViolation(f"Data-In DataSN {w36}, expected {task.exp_data_sn}")
            task.exp_data_sn += 1
            data = pdu.data
            end = w40 + len(data)
            if end > task.read_len:
                raise ProtocolViolation("Data-In beyond the expected transfer length")
            if task.chunks is None and w40 == 0 and flags & F_STATUS:
                task.chunks = data  # the common case: all of it in one PDU, no copy
            else:
                if not isinstance(task.chunks, bytearray):
                    prev = task.chunks
                    task.chunks = bytearray(task.read_len)
                    if prev:
                        task.chunks[: len(prev)] = prev
                task.chunks[w40:end] = data
            task.received = max(task.received, end)
            if flags & F_STATUS:
                self._complete_scsi(task, b3, b"", flags, w44)
        elif op == Op.SCSI_RSP:
            task = self.tasks.get(itt)
            if task is None:
                raise ProtocolViolation(f"SCSI Response for unknown ITT 0x{itt:x}")
            if b2 != 0:
                task.error = ISCSIError(f"target failure (iSCSI response 0x{b2:02x}) for opcode 0x{task.cdb[0]:02x}")
                self._done(task)
            else:
                self._complete_scsi(task, b3, pdu.data, flags, w44)
        elif op == Op.R2T:
            task = self.tasks.get(itt)
            if task is None or task.data_out is None:
                raise ProtocolViolation(f"R2T for unknown ITT 0x{itt:x}")
            offset, length = w40, w44
            if offset + length > len(task.data_out):
                raise ProtocolViolation("R2T beyond the data")
            self._data_out(out, task, encode_lun(task.lun), w20, offset, length)
        elif op == Op.NOP_IN:
            if w20 != RESERVED_TAG:
                # A ping from the target: answer with the same TTT, immediately, CmdSN not advanced.
                data = pdu.data
                self._frame(out, _BHS.pack(Op.NOP_OUT | 0x40, F_FINAL, 0, 0, len(data), bytes(bhs[8:16]), RESERVED_TAG, w20, self.cmd_sn, self.exp_stat_sn, 0, 0, 0, 0), data)
            if itt != RESERVED_TAG:
                task = self.tasks.get(itt)
                if task is not None:
                    task.response = pdu.data
                    self._done(task)
        elif op == Op.TASK_MGMT_RSP:
            task = self.tasks.get(itt)
            if task is not None:
                task.response = b2
                self._done(task)
        elif op == Op.TEXT_RSP:
            task = self.tasks.get(itt)
            if task is not None:
                self.text_acc += pdu.data
                if len(self.text_acc) > 1 << 20:
                    raise ProtocolViolation("Text Response too long")
                if flags & F_FINAL:
                    task.response = bytes(self.text_acc)
                    self.text_acc.clear()
                    self._done(task)
                else:  # ask for the rest (same ITT, the target's TTT)
                    self._frame(out, _BHS.pack(Op.TEXT_REQ | 0x40, F_FINAL, 0, 0, 0, bytes(8), itt, w20, self.cmd_sn, self.exp_stat_sn, 0, 0, 0, 0))
        elif op == Op.LOGOUT_RSP:
            task = self.tasks.get(itt)
            if task is not None:
                task.response = b2
                self._done(task)
        elif op == Op.REJECT:
            rejected = pdu.data[:48]
            ritt = struct.unpack_from(">I", rejected, 16)[0] if len(rejected) >= 20 else RESERVED_TAG
            task = self.tasks.get(ritt)
            if len(rejected) >= 1 and rejected[0] & 0x3F == Op.DATA_OUT and b2 == RejectReason.DATA_DIGEST_ERROR:
                task = None  # the command itself still ends with a SCSI Response (RFC 7143 §11.17.1)
            if task is not None:
                task.error = ISCSIError(f"target rejected the PDU (reason 0x{b2:02x})")
                self._done(task)
        elif op == Op.ASYNC_MSG:
            self.async_events.append(bhs[36])
        else:
            raise ProtocolViolation(f"unexpected PDU {pdu.describe()}")
        return out

    def _complete_scsi(self, task: Task, status: int, rsp_data: bytes, flags: int, residual: int) -> None:
        sense = None
        if rsp_data and len(rsp_data) >= 2:
            n = struct.unpack_from(">H", rsp_data)[0]
            sense = Sense.parse(rsp_data[2 : 2 + n])
        data = task.chunks
        if data is None:
            data = b""
        elif len(data) != task.received:
            data = bytes(data[: task.received])
        task.result = CommandResult(status, data, sense, residual, bool(flags & F_OVERFLOW), bool(flags & F_UNDERFLOW))  # type: ignore[arg-type]
        self._done(task)

    def _done(self, task: Task) -> None:
        self.tasks.pop(task.itt, None)
        self.completed.append(task)


ConnectFactory = Callable[[], Awaitable[trio.abc.Stream]]


class Initiator:
    """A session with one target LUN over a pluggable stream, with reconnection.

    connect: async factory returning a fresh `trio.abc.Stream` (called again after a loss).
    buffers: optional RequestBuffers, alloc'ed per request and freed when its response is in.
    command_timeout: seconds before an unanswered command makes us drop the connection and
    recover (None: wait forever).
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
        max_reconnects: int = 5,
        reconnect_delay: float = 0.1,
        command_timeout: float | None = 30.0,
        isid: bytes | None = None,
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
        self.max_reconnects = max_reconnects
        self.reconnect_delay = reconnect_delay
        self.command_timeout = command_timeout
        # ISID: type 0x80 (random), kept for the life of this object so relogins reinstate.
        self.isid = isid or bytes((0x80,)) + os.urandom(5)
        self.core: InitiatorCore | None = None
        self.stream: trio.abc.Stream | None = None
        self.params: SessionParams | None = None
        self.block_size = 512
        self.nblocks = 0
        self.reconnects = 0
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: object = None
        self._out: list[bytes] = []
        self._out_wake = trio.Event()
        self._window_changed = trio.Event()
        self._connected = trio.Event()
        self._outstanding: dict[int, Task] = {}  # seq -> task, across reconnects
        self._seq = 0
        self._closing = False
        self._dead: BaseException | None = None
        self._generation = 0
        self._recovering = False

    # --- lifecycle --------------------------------------------------------------------------------

    async def __aenter__(self) -> Initiator:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()  # type: ignore[attr-defined]
        try:
            await self.login()
        except BaseException:
            self._nursery.cancel_scope.cancel()
            await self._teardown()
            await self._nursery_cm.__aexit__(None, None, None)  # type: ignore[attr-defined]
            raise
        return self

    async def __aexit__(self, *exc: object) -> bool | None:
        if exc[0] is None and self.core is not None and self._dead is None:
            with trio.move_on_after(5):
                try:
                    await self.logout()
                except (ISCSIError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # closing anyway
        await self._teardown()
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        return await self._nursery_cm.__aexit__(*exc)  # type: ignore[attr-defined]

    async def _teardown(self) -> None:
        self._closing = True
        if self.stream is not None:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
            self.stream = None

    async def login(self) -> None:
        """Connect and log in (normal session), then probe the LUN's capacity."""
        if self._nursery is None:
            raise RuntimeError("use `async with Initiator(...)` (it owns the receive task)")
        await self._connect_and_login()
        cap = await self.command(scsi.cdb_read_capacity16(32), read_len=32, check=False)
        if cap.status == Status.GOOD and len(cap.data) >= 12:
            last, self.block_size = struct.unpack_from(">QI", cap.data)
            self.nblocks = last + 1
        else:
            cap = await self.command(scsi.cdb_read_capacity10(), read_len=8)
            last, self.block_size = struct.unpack_from(">II", cap.data)
            self.nblocks = last + 1

    async def _connect_and_login(self) -> None:
        stream = await self.connect()
        try:
            core, reader = await _login(stream, self.config, isid=self.isid, tsih=0)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        self.stream = stream
        self.core = core
        self.params = core.params
        self._generation += 1
        self._out = []
        self._out_wake = trio.Event()
        assert self._nursery is not None
        self._nursery.start_soon(self._receiver, stream, core, reader, self._generation)
        self._nursery.start_soon(self._sender, stream, self._generation)
        if self.command_timeout is not None:
            self._nursery.start_soon(self._watchdog, stream, self._generation)
        self._connected.set()
        self._kick_window()

    async def logout(self) -> None:
        """Close the session (Logout reason 0) and the connection."""
        if self.core is None or self.stream is None:
            return
        task = Task("logout")
        task.immediate = True
        self._closing = True  # the target closes the connection after answering
        with trio.move_on_after(self.command_timeout or 30):
            try:
                await self._issue(task)
            except (ISCSIError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        self._closing = True
        await self._teardown()
        self._fail_all(ISCSIError("logged out"))  # later and unfinished commands fail, not hang

    # --- the receive side -------------------------------------------------------------------------

    async def _receiver(self, stream: trio.abc.Stream, core: InitiatorCore, reader: PduReader, generation: int) -> None:
        try:
            while True:
                while True:
                    try:
                        pdu = reader.next()
                    except DataDigestError as e:
                        raise ProtocolViolation(str(e)) from None
                    if pdu is None:
                        break
                    replies = core.receive(pdu)
                    if replies:
                        self._enqueue(replies)
                    if core.completed:
                        self._finish_completed(core)
                    if core.async_events:
                        events, core.async_events = core.async_events, []
                        if any(e in (2, 3) for e in events):
                            raise ProtocolViolation("target dropped the connection (async event)")
                self._kick_window()
                data = await stream.receive_some(262144)
                if not data:
                    raise ConnectionError("target closed the connection")
                reader.feed(data)
        except (ProtocolViolation, PduError, ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            if self._closing or generation != self._generation:
                return
            log.info("connection lost (%s); recovering the session", e)
            await self._recover(e)

    def _finish_completed(self, core: InitiatorCore) -> None:
        done, core.completed = core.completed, []
        for task in done:
            self._outstanding.pop(task.seq, None)
            if task.done is not None:
                task.done.set()

    def _kick_window(self) -> None:
        ev, self._window_changed = self._window_changed, trio.Event()
        ev.set()

    async def _recover(self, cause: BaseException) -> None:
        """Log in again (reinstating the session) and reissue what was outstanding."""
        self._recovering = True
        try:
            await self._recover_inner(cause)
        finally:
            self._recovering = False

    async def _recover_inner(self, cause: BaseException) -> None:
        self._generation += 1  # retire the old connection's sender and watchdog
        self._out_wake.set()
        self._connected = trio.Event()
        self.core = None
        old = self.stream
        self.stream = None
        if old is not None:
            with trio.CancelScope(shield=True):
                await old.aclose()
        last: BaseException = cause
        for attempt in range(self.max_reconnects):
            await trio.sleep(self.reconnect_delay * (2**attempt))
            try:
                await self._connect_and_login()
            except (OSError, LoginError, ConnectionError, trio.BrokenResourceError, PduError, ISCSIError) as e:
                last = e
                continue
            self.reconnects += 1
            pending = sorted(self._outstanding.values(), key=lambda t: t.seq)
            for task in pending:
                if task.gen and task.kind in ("scsi", "nop", "text"):
                    self._nursery.start_soon(self._resend, task)  # type: ignore[union-attr]
            return
        self._fail_all(ISCSIError(f"session lost and {self.max_reconnects} reconnects failed: {last}"))

    def _fail_all(self, error: ISCSIError) -> None:
        self._dead = error
        for task in list(self._outstanding.values()):
            task.error = error
            self._outstanding.pop(task.seq, None)
            if task.done is not None:
                task.done.set()
        self._connected.set()
        self._kick_window()

    async def _resend(self, task: Task) -> None:
        try:
            await self._send(task)
        except ISCSIError:
            pass  # the session is dead: _recover already failed the task

    # --- the send side ----------------------------------------------------------------------------

    def _enqueue(self, chunks: list[bytes]) -> None:
        self._out.extend(chunks)
        self._out_wake.set()

    async def _sender(self, stream: trio.abc.Stream, generation: int) -> None:
        """One writer per connection: whatever accumulated while it sent goes out in one write,
        so with many commands in flight there are far fewer syscalls than commands."""
        try:
            while generation == self._generation:
                if not self._out:
                    self._out_wake = trio.Event()
                    await self._out_wake.wait()
                    continue
                data = b"".join(self._out)
                self._out.clear()
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            with trio.CancelScope(shield=True):
                await stream.aclose()  # the receiver notices and recovers

    async def _watchdog(self, stream: trio.abc.Stream, generation: int) -> None:
        """Drop the connection when a command goes unanswered for command_timeout seconds."""
        timeout = self.command_timeout
        assert timeout is not None
        while generation == self._generation:
            await trio.sleep(timeout / 4)
            now = trio.current_time()
            if any(t.gen == generation and now - t.sent_at > timeout for t in self._outstanding.values()):
                log.warning("command unanswered for %.1fs; dropping the connection", timeout)
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                return

    async def _send(self, task: Task) -> None:
        while True:
            if self._dead is not None:
                raise self._dead
            if task.gen == self._generation:
                return  # recovery already reissued it on this connection
            core = self.core
            if core is None:
                await self._connected.wait()
                continue
            if not task.immediate and not core.window_open():
                await self._window_changed.wait()
                continue
            # Synchronous from here: CmdSN order is queue order.
            self._enqueue(core.submit(task))
            task.gen = self._generation
            task.sent_at = trio.current_time()
            return

    async def _issue(self, task: Task) -> Task:
        task.done = trio.Event()
        nbytes = 48 + (len(task.data_out) if task.data_out is not None else 0) + task.read_len
        task.token = await self.buffers.alloc(nbytes)
        try:
            self._seq += 1
            task.seq = self._seq
            self._outstanding[task.seq] = task
            await self._send(task)
            await task.done.wait()
            if task.error is not None:
                raise task.error
            return task
        finally:
            self._outstanding.pop(task.seq, None)
            self.buffers.free(task.token)

    # --- commands ---------------------------------------------------------------------------------

    async def command(self, cdb: bytes, *, data_out: bytes | bytearray | memoryview | None = None, read_len: int = 0, check: bool = True) -> CommandResult:
        """Run one SCSI command on this LUN; raises ScsiError unless GOOD (when `check`)."""
        mv = memoryview(data_out) if data_out is not None else None
        cdb = bytes(cdb)
        delay = 0.005
        for attempt in range(BUSY_RETRIES):
            task = Task("scsi", self.lun, cdb, mv, read_len)
            await self._issue(task)
            res = task.result
            assert res is not None
            # As the Linux SCSI midlayer does: a busy target or a unit attention is not a failure
            # of the command; try it again (bounded).
            busy = res.status in (Status.BUSY, Status.TASK_SET_FULL)
            ua = res.status == Status.CHECK_CONDITION and res.sense is not None and res.sense.key == SenseKey.UNIT_ATTENTION
            if not (busy or (ua and attempt < 3)):
                break
            if busy:
                await trio.sleep(delay)
                delay = min(delay * 2, 0.5)
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
        return (await self.command(scsi.cdb_inquiry(alloc, evpd, page), read_len=alloc)).data

    async def test_unit_ready(self) -> None:
        await self.command(scsi.cdb_test_unit_ready())

    async def report_luns(self) -> list[int]:
        from .pdu import decode_lun

        data = (await self.command(scsi.cdb_report_luns(4096), read_len=4096)).data
        n = struct.unpack_from(">I", data)[0]
        return [decode_lun(data[8 + i : 16 + i]) for i in range(0, min(n, len(data) - 8), 8)]

    async def nop(self, data: bytes = b"") -> bytes:
        """NOP-Out ping; returns the echoed data."""
        task = Task("nop", self.lun)
        task.payload = data
        task.immediate = True
        await self._issue(task)
        return task.response  # type: ignore[return-value]

    async def task_management(self, function: int, ref_itt: int = RESERVED_TAG, ref_cmd_sn: int = 0) -> int:
        """Task Management Function request; returns the TMF response code."""
        task = Task("tmf", self.lun)
        task.immediate = True
        task.response = (function, ref_itt, ref_cmd_sn)
        await self._issue(task)
        return task.response  # type: ignore[return-value]


async def _login(stream: trio.abc.Stream, config: InitiatorConfig, *, isid: bytes, tsih: int = 0) -> tuple[InitiatorCore, PduReader]:
    """Run the login phase on `stream`; returns the full-feature core and the framer."""
    reader = PduReader(max_data=max(8192, config.max_recv_data_segment_length))
    login = InitiatorLogin(config, isid=isid, tsih=tsih, cmd_sn=1, exp_stat_sn=0)
    req: Pdu | None = login.start()
    with trio.fail_after(30):
        while req is not None:
            await stream.send_all(req.encode())
            rsp = None
            while rsp is None:
                rsp = reader.next()
                if rsp is None:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise ConnectionError("target closed the connection during login")
                    reader.feed(data)
            req = login.receive(rsp)
    params = login.params
    reader.header_digest = params.header_digest
    reader.data_digest = params.data_digest
    reader.max_data = params.max_recv_data_segment_length
    core = InitiatorCore(params, cmd_sn=login.cmd_sn, exp_stat_sn=login.exp_stat_sn, exp_cmd_sn=login.exp_cmd_sn, max_cmd_sn=login.max_cmd_sn)
    return core, reader


async def discover(connect: ConnectFactory, *, initiator_name: str = "iqn.2024-01.org.netswap:initiator") -> list[tuple[str, str]]:
    """A discovery session: SendTargets=All -> [(TargetName, TargetAddress), ...]."""
    stream = await connect()
    try:
        config = InitiatorConfig(initiator_name=initiator_name, session_type="Discovery")
        core, reader = await _login(stream, config, isid=bytes((0x80,)) + os.urandom(5))
        task = Task("text")
        task.payload = encode_text([("SendTargets", "All")])
        await stream.send_all(b"".join(core.submit(task)))
        with trio.fail_after(30):
            while task not in core.completed:
                pdu = reader.next()
                if pdu is None:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise ConnectionError("target closed the discovery session")
                    reader.feed(data)
                    continue
                replies = core.receive(pdu)
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
        logout = Task("logout")
        logout.immediate = True
        with trio.move_on_after(5):
            await stream.send_all(b"".join(core.submit(logout)))
        return found
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
