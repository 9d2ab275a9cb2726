"""The initiator's side of one connection in the full feature phase (RFC 7143), sans-IO.

`submit(task)` gives the bytes of a request (command, immediate and unsolicited data);
`receive(pdu)` gives the bytes to send back (Data-Out for an R2T, the answer to a NOP-In ping) and
moves answered tasks to `completed`. It knows ITTs, CmdSN/ExpStatSN and the target's CmdSN window;
what to do with an answer (retry, reissue after a loss, give up) is the session's business.
"""

from __future__ import annotations

import struct

from .initiator_task import CommandResult, ISCSIError, Task, TaskKind
from .keys import SessionParams
from .pdu import (
    BHS,
    F_FINAL,
    F_OVERFLOW,
    F_READ,
    F_STATUS,
    F_UNDERFLOW,
    F_WRITE,
    RESERVED_TAG,
    SCSI_CMD_BHS,
    SN_MASK,
    Op,
    Pdu,
    RejectReason,
    encode_lun,
    frame,
    sn_gt,
)
from .sense import Sense

ATTR_SIMPLE = 1
MAX_TEXT_RESPONSE = 1 << 20
ASYNC_DROP_CONNECTION = (2, 3)  # AsyncEvent: the target drops this connection / all of them
_LUN0 = bytes(8)


class ProtocolViolation(Exception):
    """The target broke the protocol: the connection must be dropped (ErrorRecoveryLevel 0)."""


class InitiatorConnection:
    """One logged-in connection's full feature phase."""

    def __init__(self, params: SessionParams, *, cmd_sn: int, exp_stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int,
                 conn_id: int = 1) -> None:
        self.params = params
        self.hd = params.header_digest
        self.dd = params.data_digest
        self.conn_id = conn_id
        self.cmd_sn = cmd_sn
        self.exp_stat_sn = exp_stat_sn
        self.exp_cmd_sn = exp_cmd_sn
        self.max_cmd_sn = max_cmd_sn
        self.tasks: dict[int, Task] = {}  # ITT -> task on this connection
        self.next_itt = 1
        self.completed: list[Task] = []
        self.text_acc = bytearray()

    # --- sending ----------------------------------------------------------------------------------

    def window_open(self) -> bool:
        return not sn_gt(self.cmd_sn, self.max_cmd_sn)

    def _frame(self, out: list[bytes], bhs: bytes, data: bytes | bytearray | memoryview = b"") -> None:
        frame(out, bhs, data, header_digest=self.hd, data_digest=self.dd)

    def _alloc_itt(self, task: Task) -> None:
        itt = self.next_itt
        while itt in self.tasks or itt == RESERVED_TAG:
            itt = (itt + 1) & SN_MASK
        self.next_itt = (itt + 1) & SN_MASK
        task.itt = itt
        self.tasks[itt] = task

    def submit(self, task: Task, out: list[bytes]) -> None:
        """Assign ITT and CmdSN and append the request (plus immediate/unsolicited data) to `out`."""
        self._alloc_itt(task)
        task.conn_id = self.conn_id
        task.cmd_sn = self.cmd_sn
        task.exp_data_sn = 0
        task.received = 0
        task.chunks = None
        task.result = None
        if not task.immediate:
            self.cmd_sn = (self.cmd_sn + 1) & SN_MASK
        imm = 0x40 if task.immediate else 0
        kind = task.kind
        if kind is TaskKind.SCSI:
            self._scsi_command(task, encode_lun(task.lun), out)
        elif kind is TaskKind.NOP:
            data = task.payload
            self._frame(out, BHS.pack(Op.NOP_OUT | imm, F_FINAL, 0, 0, len(data), encode_lun(task.lun), task.itt,
                                      RESERVED_TAG, task.cmd_sn, self.exp_stat_sn, 0, 0, 0, 0), data)
        elif kind is TaskKind.TMF:
            function, rtt, ref_cmd_sn = task.tmf
            self._frame(out, BHS.pack(Op.TASK_MGMT_REQ | 0x40, F_FINAL | function, 0, 0, 0, encode_lun(task.lun), task.itt,
                                      rtt, task.cmd_sn, self.exp_stat_sn, ref_cmd_sn, 0, 0, 0))
        elif kind is TaskKind.TEXT:
            data = task.payload
            self._frame(out, BHS.pack(Op.TEXT_REQ | imm, F_FINAL, 0, 0, len(data), _LUN0, task.itt, RESERVED_TAG,
                                      task.cmd_sn, self.exp_stat_sn, 0, 0, 0, 0), data)
        else:  # Logout, reason 0: close the session
            self._frame(out, BHS.pack(Op.LOGOUT_REQ | 0x40, F_FINAL, 0, 0, 0, _LUN0, task.itt, 0, task.cmd_sn,
                                      self.exp_stat_sn, 0, 0, 0, 0))

    def _scsi_command(self, task: Task, lun: bytes, out: list[bytes]) -> None:
        p = self.params
        data = task.data_out
        edtl = len(data) if data is not None else task.read_len
        flags = F_FINAL | ATTR_SIMPLE
        imm: memoryview | bytes = b""
        unsolicited_end = 0
        if data is not None and len(data):
            flags |= F_WRITE
            first = min(len(data), p.first_burst_length)
            if p.immediate_data:
                imm = data[: min(first, p.peer_max_recv_data_segment_length)]
            unsolicited_end = first if not p.initial_r2t else len(imm)
            if unsolicited_end > len(imm):
                flags &= ~F_FINAL  # unsolicited Data-Out follows
        elif task.read_len:
            flags |= F_READ
        self._frame(out, SCSI_CMD_BHS.pack(Op.SCSI_CMD | (0x40 if task.immediate else 0), flags, 0, 0, len(imm), lun,
                                           task.itt, edtl, task.cmd_sn, self.exp_stat_sn, task.cdb.ljust(16, b"\0")), imm)
        if unsolicited_end > len(imm):
            self._data_out(out, task, lun, RESERVED_TAG, len(imm), unsolicited_end - len(imm))

    def _data_out(self, out: list[bytes], task: Task, lun: bytes, ttt: int, offset: int, length: int) -> None:
        data = task.data_out
        assert data is not None
        mrdsl = self.params.peer_max_recv_data_segment_length
        end = offset + length
        data_sn = 0
        while offset < end:
            n = min(mrdsl, end - offset)
            last = offset + n >= end
            self._frame(out, BHS.pack(Op.DATA_OUT, F_FINAL if last else 0, 0, 0, n, lun, task.itt, ttt, 0,
                                      self.exp_stat_sn, 0, data_sn, offset, 0), data[offset : offset + n])
            offset += n
            data_sn += 1

    # --- receiving --------------------------------------------------------------------------------

    def receive(self, pdu: Pdu) -> list[bytes]:
        """Take one PDU from the target; returns what must be sent in reply. Raises
        ProtocolViolation when the connection cannot go on."""
        bhs = pdu.bhs
        op = bhs[0] & 0x3F
        _, flags, b2, b3, _, _, itt, w20, stat_sn, exp_cmd_sn, max_cmd_sn, w36, w40, w44 = BHS.unpack(bhs)
        if op != Op.DATA_IN or flags & F_STATUS:
            if op not in (Op.R2T, Op.ASYNC_MSG) and not (op == Op.NOP_IN and itt == RESERVED_TAG):
                self.exp_stat_sn = (stat_sn + 1) & SN_MASK
        # RFC 7143 §4.2.2.1: a MaxCmdSN below ExpCmdSN - 1 is not a window; ignore it.
        if op != Op.LOGIN_RSP and not sn_gt(exp_cmd_sn, (max_cmd_sn + 1) & SN_MASK):
            if sn_gt(max_cmd_sn, self.max_cmd_sn):
                self.max_cmd_sn = max_cmd_sn
            if sn_gt(exp_cmd_sn, self.exp_cmd_sn):
                self.exp_cmd_sn = exp_cmd_sn
        out: list[bytes] = []
        if op == Op.DATA_IN:
            self._data_in(pdu, flags, b3, itt, w36, w40, w44)
        elif op == Op.SCSI_RSP:
            task = self._task(itt, "SCSI Response")
            if b2 != 0:
                task.error = ISCSIError(f"target failure (iSCSI response 0x{b2:02x}) for {task.describe()}")
                self._done(task)
            else:
                self._complete_scsi(task, b3, pdu.data, flags, w44)
        elif op == Op.R2T:
            task = self._task(itt, "R2T")
            if task.data_out is None or w40 + w44 > len(task.data_out):
                raise ProtocolViolation(f"R2T beyond the data of ITT 0x{itt:x}")
            self._data_out(out, task, encode_lun(task.lun), w20, w40, w44)
        elif op == Op.NOP_IN:
            if w20 != RESERVED_TAG:
                # A ping from the target: answer with its TTT, immediately, CmdSN not advanced.
                data = pdu.data
                self._frame(out, BHS.pack(Op.NOP_OUT | 0x40, F_FINAL, 0, 0, len(data), bytes(bhs[8:16]), RESERVED_TAG, w20,
                                          self.cmd_sn, self.exp_stat_sn, 0, 0, 0, 0), data)
            if itt != RESERVED_TAG:
                self._answer(itt, pdu.data)
        elif op in (Op.TASK_MGMT_RSP, Op.LOGOUT_RSP):
            self._answer(itt, b2)
        elif op == Op.TEXT_RSP:
            text_task = self.tasks.get(itt)
            if text_task is not None:
                self.text_acc += pdu.data
                if len(self.text_acc) > MAX_TEXT_RESPONSE:
                    raise ProtocolViolation("Text Response too long")
                if flags & F_FINAL:
                    text_task.response = bytes(self.text_acc)
                    self.text_acc.clear()
                    self._done(text_task)
                else:  # ask for the rest: same ITT, the target's TTT
                    self._frame(out, BHS.pack(Op.TEXT_REQ | 0x40, F_FINAL, 0, 0, 0, _LUN0, itt, w20, self.cmd_sn,
                                              self.exp_stat_sn, 0, 0, 0, 0))
        elif op == Op.REJECT:
            self._reject(pdu, b2)
        elif op == Op.ASYNC_MSG:
            if bhs[36] in ASYNC_DROP_CONNECTION:
                raise ProtocolViolation(f"target dropped the connection (AsyncEvent {bhs[36]})")
        else:
            raise ProtocolViolation(f"unexpected PDU {pdu.describe()}")
        return out

    def _task(self, itt: int, what: str) -> Task:
        task = self.tasks.get(itt)
        if task is None:
            raise ProtocolViolation(f"{what} for unknown ITT 0x{itt:x}")
        return task

    def _answer(self, itt: int, response: object) -> None:
        task = self.tasks.get(itt)
        if task is not None:
            task.response = response
            self._done(task)

    def _data_in(self, pdu: Pdu, flags: int, status: int, itt: int, data_sn: int, offset: int, residual: int) -> None:
        task = self._task(itt, "Data-In")
        if data_sn != task.exp_data_sn:
            raise ProtocolViolation(f"Data-In DataSN {data_sn}, expected {task.exp_data_sn}")
        task.exp_data_sn += 1
        data = pdu.data
        end = offset + len(data)
        if end > task.read_len:
            raise ProtocolViolation("Data-In beyond the expected transfer length")
        if task.chunks is None and offset == 0 and flags & F_STATUS:
            task.chunks = data  # the common case: all of it in one PDU, no copy
        else:
            if not isinstance(task.chunks, bytearray):
                prev = task.chunks
                task.chunks = bytearray(task.read_len)
                if prev:
                    task.chunks[: len(prev)] = prev
            task.chunks[offset:end] = data
        task.received = max(task.received, end)
        if flags & F_STATUS:
            self._complete_scsi(task, status, b"", flags, residual)

    def _reject(self, pdu: Pdu, reason: int) -> None:
        rejected = pdu.data[:48]
        if len(rejected) < 20:
            return
        if rejected[0] & 0x3F == Op.DATA_OUT and reason == RejectReason.DATA_DIGEST_ERROR:
            return  # the command itself still ends with a SCSI Response (RFC 7143 §11.17.1)
        task = self.tasks.get(struct.unpack_from(">I", rejected, 16)[0])
        if task is not None:
            task.error = ISCSIError(f"target rejected the PDU of {task.describe()} (reason 0x{reason:02x})")
            self._done(task)

    def _complete_scsi(self, task: Task, status: int, rsp_data: bytes | bytearray | memoryview, flags: int,
                       residual: int) -> None:
        sense = None
        if len(rsp_data) >= 2:
            n = struct.unpack_from(">H", rsp_data)[0]
            sense = Sense.parse(rsp_data[2 : 2 + n])
        data = task.chunks
        if data is None:
            data = b""
        elif len(data) != task.received:
            data = bytes(data[: task.received])
        task.result = CommandResult(status, data, sense, residual, bool(flags & F_OVERFLOW), bool(flags & F_UNDERFLOW))
        self._done(task)

    def _done(self, task: Task) -> None:
        self.tasks.pop(task.itt, None)
        task.conn_id = 0
        self.completed.append(task)

    def take_completed(self) -> list[Task]:
        done, self.completed = self.completed, []
        return done
