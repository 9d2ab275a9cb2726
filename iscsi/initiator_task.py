"""What an initiator asks of a target, and what it gets back: `Task`, `CommandResult`, the errors.

A `Task` outlives the connection it was first sent on: after a lost connection the session core
sends the same task again on the next one (with a new ITT and CmdSN). It is plain data: the trio
driver keeps its own waiter per task.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .sense import Sense, Status


class ISCSIError(Exception):
    """A protocol-level failure: login refused, PDU rejected, session lost for good."""


class SessionRecoveryTimeout(ISCSIError):
    """The session could not be re-established within `replacement_timeout` seconds: every
    command still outstanding fails with this (open-iscsi: "session recovery timed out")."""


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


class TaskKind(enum.Enum):
    SCSI = "scsi"
    NOP = "nop"
    TMF = "tmf"
    TEXT = "text"
    LOGOUT = "logout"


@dataclass
class CommandResult:
    status: int
    data: bytes | bytearray | memoryview = b""
    sense: Sense | None = None
    residual: int = 0
    overflow: bool = False
    underflow: bool = False


class Task:
    """One request: a SCSI command, a NOP-Out ping, a TMF, a Text request or a Logout."""

    __slots__ = ("kind", "lun", "cdb", "data_out", "read_len", "immediate", "payload", "tmf",
                 "seq", "itt", "cmd_sn", "conn_id", "sent_at", "chunks", "received", "exp_data_sn",
                 "result", "response", "error", "busy_retries", "ua_retries", "finished")

    def __init__(self, kind: TaskKind, lun: int = 0, cdb: bytes = b"", data_out: memoryview | None = None,
                 read_len: int = 0, *, immediate: bool = False, payload: bytes = b"",
                 tmf: tuple[int, int, int] = (0, 0, 0)) -> None:
        self.kind = kind
        self.lun = lun
        self.cdb = cdb
        self.data_out = data_out
        self.read_len = read_len
        self.immediate = immediate  # delivered at once, CmdSN not advanced (NOP, TMF, Logout)
        self.payload = payload  # NOP-Out ping data or Text request text
        self.tmf = tmf  # (function, referenced task tag, RefCmdSN)
        # Session bookkeeping.
        self.seq = 0  # issue order, across connections
        self.itt = 0
        self.cmd_sn = 0
        self.conn_id = 0  # the connection it was last sent on (0: not on any)
        self.sent_at = 0.0
        # The transfer in progress.
        self.chunks: bytearray | bytes | memoryview | None = None
        self.received = 0
        self.exp_data_sn = 0
        # The outcome.
        self.result: CommandResult | None = None
        self.response: object = None  # NOP-In data, TMF response code, Text response, Logout response
        self.error: ISCSIError | None = None
        self.busy_retries = 0
        self.ua_retries = 0
        self.finished = False

    def describe(self) -> str:
        if self.kind is TaskKind.SCSI and self.cdb:
            return f"SCSI opcode 0x{self.cdb[0]:02x}"
        return self.kind.value
