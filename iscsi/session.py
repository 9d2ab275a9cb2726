"""Target side of the full feature phase (RFC 7143): one session on one connection, sans-IO.

`receive(pdu)` appends encoded PDUs to `out`; the driver sends them, after an fsync when
`sync_needed` says so (FUA writes and SYNCHRONIZE CACHE answer only once the data is on disk).
For service times the driver sets `now` (when the bytes being fed arrived) and takes `done`: the
arrival time of each SCSI command answered since, in the order of their answers.
Commands outside the CmdSN window are silently ignored; commands ahead of ExpCmdSN wait (bounded by
the window) until the gap fills. `TargetCore` is what the sessions of one target share: its LUNs,
its sessions, and the resets that reach all of them.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from . import sense as S
from .inquiry import MAX_TRANSFER_BYTES, no_such_lun, report_luns
from .keys import LOGIN_ONLY, NegotiationError, SessionParams, number
from .login import LoginResult
from .lun import DiskLun
from .nexus import Nexus
from .pdu import (
    BHS,
    F_FINAL,
    F_OVERFLOW,
    F_STATUS,
    F_UNDERFLOW,
    RESERVED_TAG,
    Op,
    Pdu,
    RejectReason,
    TmfFunction,
    TmfResponse,
    bhs_itt,
    decode_lun,
    encode_lun,
    encode_text,
    frame,
    op_name,
    parse_text,
    sn_lt,
)
from .scsi import READS, WRITE_SAMES, Opcode
from .sense import ScsiResult, Status, illegal_request
from .xcopy import CopyManager

log = logging.getLogger("iscsi.target")

MASK = 0xFFFFFFFF
CMD_WINDOW = 128
MAX_WRITE_BUFFERED = 64 << 20  # per session: beyond this, new writes get TASK SET FULL
MAX_TARGET_WRITE_BUFFERED = 256 << 20  # the same, over all sessions of the target
MAX_TEXT = 64 << 10

_ITT_EDTL_CMDSN = struct.Struct(">III")
_RW10 = struct.Struct(">IxH")  # LBA, TRANSFER LENGTH from CDB byte 2 (BHS byte 34)
_RW16 = struct.Struct(">QI")
_FAST_OPS = frozenset({0x28, 0x88, 0x2A, 0x8A, 0x35, 0x91})  # READ, WRITE, SYNCHRONIZE CACHE (10/16)
_LUN0 = bytes(8)


@dataclass
class TargetCore:
    """What all sessions of one target share: its LUNs and its sessions (for resets)."""

    target_name: str
    luns: dict[int, DiskLun]
    portal: str = "127.0.0.1:3260"
    portal_group_tag: int = 1
    sessions: set["TargetSession"] = field(default_factory=set)
    write_buffered: int = 0  # bytes of Data-Out held for unfinished writes, all sessions
    by_field: dict[bytes, DiskLun] = field(default_factory=dict)  # the BHS LUN field -> LU

    def __post_init__(self) -> None:
        copy_manager = CopyManager(self.luns.values)
        for n, lun in self.luns.items():
            self.by_field[encode_lun(n)] = lun
            lun.copy_manager = copy_manager
            lun.logged_in = self.nexuses
            lun.abort_tasks_of = lambda nexuses, n=n: self.abort_tasks_of(nexuses, n)  # type: ignore[misc]

    def lun_list(self) -> list[int]:
        return sorted(self.luns)

    def nexuses(self) -> set[Nexus]:
        """The I_T nexuses logged in now."""
        return {s.nexus for s in self.sessions if not s.discovery}

    def abort_tasks_of(self, nexuses: list[Nexus], lun: int) -> None:
        for s in list(self.sessions):
            if s.nexus in nexuses:
                s.abort_tasks(lun)

    def lun_reset(self, lun_no: int, origin: TargetSession) -> None:
        """LOGICAL UNIT RESET: every session's tasks for the LU are aborted (no responses), and
        every I_T nexus, the sender's included, gets a UNIT ATTENTION (SAM-5 §7.7)."""
        for s in self.sessions | {origin}:
            s.abort_tasks(lun_no)
        self.luns[lun_no].reset(S.BUS_DEVICE_RESET_FUNCTION_OCCURRED)

    def target_warm_reset(self, origin: TargetSession) -> None:
        """TARGET WARM RESET: every LU is reset as by a LOGICAL UNIT RESET (RFC 7143 §11.5.1)."""
        for s in self.sessions | {origin}:
            s.abort_tasks(None)
        for lun in self.luns.values():
            lun.reset(S.SCSI_BUS_RESET_OCCURRED)


@dataclass
class WriteTask:
    itt: int
    cmd_sn: int
    lun: int
    cdb: bytes
    edtl: int
    spdtl: int
    buf: bytearray
    received: int = 0
    seq_end: int = 0  # end offset of the current (unsolicited or R2T) sequence
    in_unsolicited: bool = False
    ttt: int = RESERVED_TAG
    exp_data_sn: int = 0
    r2t_sn: int = 0
    error: bool = False
    error_asc: tuple[int, int] = S.DATA_PHASE_ERROR  # the sense the failed write is answered with
    arrived: float = 0.0  # the driver's `now` when its command arrived


class TargetSession:
    def __init__(self, core: TargetCore, login: LoginResult, *, window: int = CMD_WINDOW) -> None:
        self.core = core
        self.login = login
        self.params: SessionParams = login.params
        self.discovery = login.session_type == "Discovery"
        self.hd = self.params.header_digest
        self.dd = self.params.data_digest
        self.mrdsl = self.params.peer_max_recv_data_segment_length
        self.exp_cmd_sn = login.cmd_sn
        self.stat_sn = login.stat_sn
        self.window = window
        self.out: list[bytes] = []
        self.sync_luns: set[DiskLun] = set()
        self.closing = False
        self.now = 0.0  # the driver's time of the input being received (for `done` only)
        self.done: list[float] = []  # arrival times of the SCSI commands answered, for the driver
        self.cmd_at = 0.0  # arrival time of the command being handled
        self.pending_at: dict[int, float] = {}  # CmdSN -> arrival time of a queued command
        # CmdSN -> command waiting for an earlier CmdSN; None marks an aborted one, a slot the
        # sequence still steps past (deleting it would stall ExpCmdSN for good).
        self.pending: dict[int, Pdu | None] = {}
        self.writes: dict[int, WriteTask] = {}  # ITT -> write waiting for Data-Out
        self.by_ttt: dict[int, WriteTask] = {}
        self.write_buffered = 0
        self.next_ttt = 1
        self.text_buf = bytearray()
        self.nop_ttt = 0x10000000
        self.nops_unanswered = 0
        self.portal: str | None = None  # the address this connection reached us on
        self.nexus = Nexus(login.initiator_name, login.isid)  # for reservations and unit attentions
        self.stats = {"commands": 0, "ignored": 0, "rejects": 0, "data_in": 0, "r2t": 0}
        self.dispatch: dict[int, Callable[[Pdu], None]] = {
            Op.SCSI_CMD: self._scsi_cmd,
            Op.NOP_OUT: self._nop_out,
            Op.TASK_MGMT_REQ: self._tmf,
            Op.TEXT_REQ: self._text,
            Op.LOGOUT_REQ: self._logout,
        }

    # --- output -----------------------------------------------------------------------------------

    @property
    def max_cmd_sn(self) -> int:
        return (self.exp_cmd_sn + self.window - 1) & MASK

    def _emit(self, bhs: bytes, data: bytes | bytearray | memoryview = b"") -> None:
        frame(self.out, bhs, data, header_digest=self.hd, data_digest=self.dd)

    def _status_sn(self) -> int:
        sn = self.stat_sn
        self.stat_sn = (sn + 1) & MASK
        return sn

    def _pdu(self, op: int, flags: int, b2: int, b3: int, dlen: int, lun: bytes, itt: int, w20: int, *, advance: bool = True, w36: int = 0, w40: int = 0, w44: int = 0) -> bytes:
        sn = self._status_sn() if advance else self.stat_sn
        return BHS.pack(op, flags, b2, b3, dlen, lun, itt, w20, sn, self.exp_cmd_sn, self.max_cmd_sn, w36, w40, w44)

    def reject(self, bhs: bytes | bytearray, reason: int) -> None:
        self.stats["rejects"] += 1
        log.info("%s: Reject (%s) of %s ITT 0x%08x", self.nexus, RejectReason(reason).name, op_name(bhs[0]), bhs_itt(bhs))
        hdr = bytes(bhs[:48])
        self._emit(self._pdu(Op.REJECT, F_FINAL, reason, 0, len(hdr), bytes(8), RESERVED_TAG, 0), hdr)

    def scsi_response(self, itt: int, status: int, sense: S.Sense | None = None, *, resid_flags: int = 0, resid: int = 0, exp_data_sn: int = 0) -> None:
        data = b""
        if sense is not None:
            sd = sense.fixed()
            data = struct.pack(">H", len(sd)) + sd
        self._emit(self._pdu(Op.SCSI_RSP, F_FINAL | resid_flags, 0, status, len(data), bytes(8), itt, 0, w36=exp_data_sn, w44=resid), data)
        self.done.append(self.cmd_at)

    # --- input ------------------------------------------------------------------------------------

    def receive(self, pdu: Pdu) -> None:
        bhs = pdu.bhs
        if bhs[0] == 0x01 and bhs[32] in _FAST_OPS and not self.pending and self._fast(bhs, pdu.data):
            return
        op = bhs[0] & 0x3F
        self.cmd_at = self.now
        handler = self.dispatch.get(op)
        if handler is None:
            if op == Op.DATA_OUT:
                self._data_out(pdu)
            elif op == Op.LOGIN_REQ:
                self.reject(bhs, RejectReason.PROTOCOL_ERROR)
            elif op == Op.SNACK:
                self.reject(bhs, RejectReason.COMMAND_NOT_SUPPORTED)  # ErrorRecoveryLevel 0
            else:
                self.reject(bhs, RejectReason.PROTOCOL_ERROR if op & 0x20 else RejectReason.COMMAND_NOT_SUPPORTED)
            return
        cmd_sn = (bhs[24] << 24) | (bhs[25] << 16) | (bhs[26] << 8) | bhs[27]
        if bhs[0] & 0x40:  # immediate: delivered now, CmdSN not advanced
            handler(pdu)
            return
        d = (cmd_sn - self.exp_cmd_sn) & MASK
        if d == 0:
            self.exp_cmd_sn = (cmd_sn + 1) & MASK
            handler(pdu)
            if self.pending:
                self._drain_pending()
        elif d < self.window:
            if cmd_sn in self.pending:
                self.stats["ignored"] += 1  # a duplicate, or a CmdSN whose command was aborted
            elif len(self.pending) < self.window:
                n = len(pdu.data)
                if n and op == Op.SCSI_CMD:
                    # Its immediate data is held until the gap fills: count it like Data-Out.
                    if self.write_buffered + n > MAX_WRITE_BUFFERED or self.core.write_buffered + n > MAX_TARGET_WRITE_BUFFERED:
                        self.pending[cmd_sn] = None  # answered now; the sequence steps past it
                        self.scsi_response(pdu.itt, Status.TASK_SET_FULL)
                        return
                    self.write_buffered += n
                    self.core.write_buffered += n
                self.pending[cmd_sn] = pdu
                self.pending_at[cmd_sn] = self.now
        else:
            self.stats["ignored"] += 1  # outside [ExpCmdSN, MaxCmdSN]: silently ignored

    def _fast(self, bhs: bytearray, data: bytes | bytearray | memoryview) -> bool:
        """The hot paths: an in-order READ (10/16) whose answer fits one Data-In, WRITE (10/16)
        whose data all came with it as immediate data, or SYNCHRONIZE CACHE (10/16), for an LU
        with no unit attention or reservation about.

        Each does exactly what the general path would (same checks, same PDU) without its
        generality (no write task, no buffer); returns False, having changed nothing, for
        anything it does not cover."""
        op = bhs[32]
        itt, edtl, cmd_sn = _ITT_EDTL_CMDSN.unpack_from(bhs, 16)
        if cmd_sn != self.exp_cmd_sn or bhs[33] & 0xE0 or bhs[4] or self.discovery:
            return False
        lun = self.core.by_field.get(bytes(bhs[8:16]))
        if lun is None or lun.ua.pending or lun.reservations:
            return False
        lba, n = _RW10.unpack_from(bhs, 34) if op < 0x80 else _RW16.unpack_from(bhs, 34)
        bs = lun.block_size
        nbytes = n * bs
        if lba + n > lun.nblocks or nbytes > MAX_TRANSFER_BYTES:
            return False
        if op == 0x28 or op == 0x88:  # READ
            if n == 0 or nbytes != edtl or nbytes > self.mrdsl or data:
                return False
            payload = os.pread(lun.fd, nbytes, lba * bs)
            if len(payload) != nbytes:
                return False
        elif op == 0x2A or op == 0x8A:  # WRITE
            if (n == 0 or nbytes != edtl or len(data) != nbytes or bhs[1] & 0xE0 != 0xA0 or lun.mode.swp
                    or not self.params.immediate_data or nbytes > self.params.first_burst_length
                    or itt in self.writes or self.write_buffered + nbytes > MAX_WRITE_BUFFERED
                    or self.core.write_buffered + nbytes > MAX_TARGET_WRITE_BUFFERED):
                return False
            os.pwrite(lun.fd, data, lba * bs)
            if bhs[33] & 0x08:  # FUA: answered once an fsync has it on disk
                self.sync_luns.add(lun)
        else:  # SYNCHRONIZE CACHE: answered once an fsync has everything on disk
            if edtl or data:
                return False
            self.sync_luns.add(lun)
        exp = self.exp_cmd_sn = (cmd_sn + 1) & MASK
        sn = self.stat_sn
        self.stat_sn = (sn + 1) & MASK
        self.stats["commands"] += 1
        max_cmd_sn = (exp + self.window - 1) & MASK
        if op == 0x28 or op == 0x88:  # Data-In with status
            hdr = BHS.pack(0x25, 0x81, 0, 0, nbytes, _LUN0, itt, RESERVED_TAG, sn, exp, max_cmd_sn, 0, 0, 0)
            frame(self.out, hdr, payload, header_digest=self.hd, data_digest=self.dd)
        else:  # SCSI Response, GOOD
            hdr = BHS.pack(0x21, F_FINAL, 0, 0, 0, _LUN0, itt, 0, sn, exp, max_cmd_sn, 0, 0, 0)
            frame(self.out, hdr, b"", header_digest=self.hd, data_digest=self.dd)
        self.done.append(self.now)
        return True

    def _drain_pending(self) -> None:
        pending = self.pending
        while self.exp_cmd_sn in pending:
            pdu = pending.pop(self.exp_cmd_sn)
            self.cmd_at = self.pending_at.pop(self.exp_cmd_sn, self.now)
            self.exp_cmd_sn = (self.exp_cmd_sn + 1) & MASK
            if pdu is not None:  # None: aborted while queued, its CmdSN counts as received
                self._release_queued(pdu)
                self.dispatch[pdu.bhs[0] & 0x3F](pdu)

    def _release_queued(self, pdu: Pdu) -> None:
        if pdu.opcode == Op.SCSI_CMD and pdu.data:
            self.write_buffered -= len(pdu.data)
            self.core.write_buffered -= len(pdu.data)

    def _unqueue(self, cmd_sn: int) -> None:
        """Abort a queued command: its slot stays, as a placeholder the sequence steps past."""
        pdu = self.pending.get(cmd_sn)
        if pdu is not None:
            self._release_queued(pdu)
        self.pending[cmd_sn] = None

    def data_digest_error(self, pdu: Pdu) -> None:
        """RFC 7143 §7.8: reject the PDU; a command it carried is not executed.

        A Data-Out's data is lost, so its write fails: answered at once if the PDU was the last of
        its sequence, else when that last one arrives (ABORTED COMMAND, PROTOCOL SERVICE CRC
        ERROR, §11.17.1) — never left waiting for data that will not come."""
        self.reject(pdu.bhs, RejectReason.DATA_DIGEST_ERROR)
        if pdu.opcode != Op.DATA_OUT:
            return
        task = self.writes.get(pdu.itt)
        if task is None:
            return
        task.error = True
        task.error_asc = S.PROTOCOL_SERVICE_CRC_ERROR
        task.exp_data_sn += 1  # the PDU itself arrived: later DataSNs stay in step
        if pdu.final:
            self._advance_write(task)

    # --- SCSI commands ----------------------------------------------------------------------------

    def _scsi_cmd(self, pdu: Pdu) -> None:
        if self.discovery:
            self.reject(pdu.bhs, RejectReason.PROTOCOL_ERROR)
            return
        bhs = pdu.bhs
        imm = pdu.data
        if imm and (not self.params.immediate_data or len(imm) > self.params.first_burst_length):
            # Data with the command that ImmediateData=No forbids, or more unsolicited data than
            # FirstBurstLength allows: a protocol error, never silently cut (RFC 7143 §13.11, §13.14).
            self.reject(bhs, RejectReason.PROTOCOL_ERROR)
            return
        self.stats["commands"] += 1
        itt, edtl = struct.unpack_from(">II", bhs, 16)
        cdb = bytes(bhs[32:48])
        lun_no = decode_lun(bhs[8:16])
        lun = self.core.luns.get(lun_no)
        op = cdb[0]
        if op == Opcode.REPORT_LUNS:  # every LU, whichever LUN it is addressed to
            self._finish(itt, edtl, report_luns(self.core.lun_list(), cdb), bytes(bhs[8:16]))
            return
        if lun is None:
            self._finish(itt, edtl, no_such_lun(cdb, self.core.lun_list()), bytes(bhs[8:16]))
            return
        early = lun.admit(self.nexus, cdb)  # UNIT ATTENTION, then RESERVATION CONFLICT
        if early is not None:
            self._finish(itt, edtl, early, bytes(bhs[8:16]))
            return
        if op in READS:
            self._finish(itt, edtl, lun.read(cdb), bytes(bhs[8:16]))
            return
        spdtl, early = lun.data_out_length(cdb)
        if early is not None:
            self._finish(itt, edtl, early, bytes(bhs[8:16]))
            return
        if edtl != spdtl and (op in WRITE_SAMES or op == Opcode.COMPARE_AND_WRITE):
            # Any other amount is not a WRITE SAME / COMPARE AND WRITE anyone meant (a CAW of
            # 256 blocks even wraps its 8-bit NUMBER OF LOGICAL BLOCKS to 0).
            asc = S.INVALID_FIELD_IN_CDB if op == Opcode.COMPARE_AND_WRITE else S.INVALID_FIELD_IN_INFORMATION_UNIT
            self.scsi_response(itt, Status.CHECK_CONDITION, illegal_request(asc))
            return
        if spdtl == 0:
            self._finish(itt, edtl, lun.execute(cdb, b"", self.nexus), bytes(bhs[8:16]), lun)
            return
        if edtl == 0:
            # Nothing may be transferred: the command moves no data (SAM-5 §5.4.3, overflow).
            self.scsi_response(itt, Status.GOOD, resid_flags=F_OVERFLOW, resid=spdtl)
            return
        if edtl > MAX_TRANSFER_BYTES:
            self.scsi_response(itt, Status.CHECK_CONDITION, illegal_request(S.INVALID_FIELD_IN_INFORMATION_UNIT))
            return
        if itt in self.writes:
            self.reject(bhs, RejectReason.TASK_IN_PROGRESS)
            return
        if self.write_buffered + edtl > MAX_WRITE_BUFFERED or self.core.write_buffered + edtl > MAX_TARGET_WRITE_BUFFERED:
            self.scsi_response(itt, Status.TASK_SET_FULL)
            return
        p = self.params
        task = WriteTask(itt, struct.unpack_from(">I", bhs, 24)[0], lun_no, cdb, edtl, spdtl, bytearray(edtl),
                         arrived=self.cmd_at)
        if imm:
            n = min(len(imm), edtl)  # beyond the EDTL: not part of the transfer (residuals)
            task.buf[:n] = imm[:n]
            task.received = n
        self.writes[itt] = task
        self.write_buffered += edtl
        self.core.write_buffered += edtl
        if not bhs[1] & F_FINAL and not p.initial_r2t:
            # Unsolicited Data-Out follows, up to FirstBurstLength, unless the immediate data
            # already filled that burst: then none can come, and waiting would wait forever.
            task.seq_end = min(edtl, p.first_burst_length)
            if task.received < task.seq_end:
                task.in_unsolicited = True
                task.exp_data_sn = 0
                return
        self._advance_write(task)

    def _advance_write(self, task: WriteTask) -> None:
        """Solicit the next burst with an R2T, or execute the write once all data is in."""
        self.cmd_at = task.arrived  # its answer's service time runs from its command's arrival
        if task.error:
            self._drop_write(task)
            self.scsi_response(task.itt, Status.CHECK_CONDITION, S.Sense(S.SenseKey.ABORTED_COMMAND, *task.error_asc))
            return
        if task.received >= task.edtl:
            self._drop_write(task)
            lun = self.core.luns.get(task.lun)
            if lun is None:  # removed by a reset race; nothing to write to
                self.scsi_response(task.itt, Status.CHECK_CONDITION, illegal_request(S.LOGICAL_UNIT_NOT_SUPPORTED))
                return
            # With EDTL != SPDTL only the bytes both sides agree on are used (libiscsi's
            # iSCSIResiduals tests check exactly that), and the response says by how much.
            res = lun.execute(task.cdb, memoryview(task.buf)[: min(task.spdtl, task.edtl)], self.nexus)
            if res.sync:
                self.sync_luns.add(lun)
            flags = resid = 0
            if task.spdtl > task.edtl:
                flags, resid = F_OVERFLOW, task.spdtl - task.edtl
            elif task.spdtl < task.edtl:
                flags, resid = F_UNDERFLOW, task.edtl - task.spdtl
            if res.status == Status.GOOD:
                self.scsi_response(task.itt, Status.GOOD, resid_flags=flags, resid=resid)
            else:
                self.scsi_response(task.itt, res.status, res.sense)
            return
        offset = task.received
        length = min(task.edtl - offset, self.params.max_burst_length)
        if task.ttt != RESERVED_TAG:
            self.by_ttt.pop(task.ttt, None)
        task.ttt = self.next_ttt
        self.next_ttt = (self.next_ttt + 1) & 0x7FFFFFFF or 1
        self.by_ttt[task.ttt] = task
        task.seq_end = offset + length
        task.in_unsolicited = False
        task.exp_data_sn = 0
        r2t_sn = task.r2t_sn
        task.r2t_sn += 1
        self.stats["r2t"] += 1
        self._emit(self._pdu(Op.R2T, F_FINAL, 0, 0, 0, encode_lun(task.lun), task.itt, task.ttt, advance=False, w36=r2t_sn, w40=offset, w44=length))

    def _drop_write(self, task: WriteTask) -> None:
        if self.writes.pop(task.itt, None) is not None:
            self.write_buffered -= task.edtl
            self.core.write_buffered -= task.edtl
        if task.ttt != RESERVED_TAG:
            self.by_ttt.pop(task.ttt, None)

    def _data_out(self, pdu: Pdu) -> None:
        bhs = pdu.bhs
        itt, ttt = struct.unpack_from(">II", bhs, 16)
        data_sn, offset = struct.unpack_from(">II", bhs, 36)
        task = self.writes.get(itt)
        if task is None:
            return  # data for a task already answered or aborted: dropped
        if ttt != RESERVED_TAG and ttt != task.ttt:
            task.error = True
        elif ttt == RESERVED_TAG and not task.in_unsolicited:
            task.error = True
        data = pdu.data
        if data_sn != task.exp_data_sn:
            task.error = True
        task.exp_data_sn += 1
        end = offset + len(data)
        if offset != task.received or end > task.seq_end:
            task.error = True
        elif not task.error:
            task.buf[offset:end] = data
            task.received = end
        if bhs[1] & F_FINAL:
            self._advance_write(task)

    def _finish(self, itt: int, edtl: int, res: ScsiResult, lun_field: bytes, lun: DiskLun | None = None) -> None:
        """Send a command's Data-In and status, with residuals against the EDTL."""
        if res.sync and lun is not None:
            self.sync_luns.add(lun)
        if res.status != Status.GOOD:
            self.scsi_response(itt, res.status, res.sense)
            return
        data = res.data
        n = len(data)
        flags = 0
        resid = 0
        if n > edtl:
            flags, resid = F_OVERFLOW, n - edtl
            data = data[:edtl]
            n = edtl
        elif n < edtl:
            flags, resid = F_UNDERFLOW, edtl - n
        if n == 0:
            self.scsi_response(itt, res.status, None, resid_flags=flags, resid=resid)
            return
        mrdsl = self.mrdsl
        self.stats["data_in"] += 1
        if n <= mrdsl:
            self._emit(
                BHS.pack(Op.DATA_IN, F_FINAL | F_STATUS | flags, 0, res.status, n, bytes(8), itt, RESERVED_TAG,
                          self._status_sn(), self.exp_cmd_sn, self.max_cmd_sn, 0, 0, resid),
                data,
            )
            self.done.append(self.cmd_at)
            return
        # Several PDUs: each at most MaxRecvDataSegmentLength, and F closes every Data-In
        # sequence of MaxBurstLength bytes (RFC 7143 §13.14); status rides on the very last.
        mv = memoryview(data) if not isinstance(data, memoryview) else data
        burst = self.params.max_burst_length
        sn = 0
        off = 0
        while off < n:
            end = min(off + mrdsl, n, (off // burst + 1) * burst)
            chunk = mv[off:end]
            if end >= n:
                bhs = BHS.pack(Op.DATA_IN, F_FINAL | F_STATUS | flags, 0, res.status, len(chunk), bytes(8), itt, RESERVED_TAG,
                                self._status_sn(), self.exp_cmd_sn, self.max_cmd_sn, sn, off, resid)
            else:
                f = F_FINAL if end % burst == 0 else 0
                bhs = BHS.pack(Op.DATA_IN, f, 0, 0, len(chunk), bytes(8), itt, RESERVED_TAG, 0, self.exp_cmd_sn, self.max_cmd_sn, sn, off, 0)
            self._emit(bhs, chunk)
            off = end
            sn += 1
        self.done.append(self.cmd_at)

    # --- NOP, TMF, Text, Logout -------------------------------------------------------------------

    def _nop_out(self, pdu: Pdu) -> None:
        itt, ttt = struct.unpack_from(">II", pdu.bhs, 16)
        if ttt != RESERVED_TAG:
            self.nops_unanswered = 0  # the answer to our NOP-In ping
        if itt == RESERVED_TAG:
            return
        data = pdu.data[: self.mrdsl]
        self._emit(self._pdu(Op.NOP_IN, F_FINAL, 0, 0, len(data), bytes(pdu.bhs[8:16]), itt, RESERVED_TAG), data)

    def nop_in_ping(self) -> None:
        """Target-initiated NOP-In (asks for a NOP-Out answer; StatSN not advanced)."""
        self.nop_ttt = (self.nop_ttt + 1) & 0x7FFFFFFF or 1
        self.nops_unanswered += 1
        self._emit(self._pdu(Op.NOP_IN, F_FINAL, 0, 0, 0, bytes(8), RESERVED_TAG, self.nop_ttt, advance=False))

    def _tmf(self, pdu: Pdu) -> None:
        bhs = pdu.bhs
        function = bhs[1] & 0x7F
        itt, rtt, cmd_sn, _exp, ref_cmd_sn = struct.unpack_from(">IIIII", bhs, 16)
        lun_no = decode_lun(bhs[8:16])
        response = TmfResponse.FUNCTION_COMPLETE
        if self.discovery:
            self.reject(bhs, RejectReason.PROTOCOL_ERROR)
            return
        if function == TmfFunction.ABORT_TASK:
            task = self.writes.get(rtt)
            if task is not None:
                self._drop_write(task)
            else:
                queued = [sn for sn, p in self.pending.items() if p is not None and p.itt == rtt]
                for sn in queued:
                    self._unqueue(sn)
                if not queued:
                    ahead = (ref_cmd_sn - self.exp_cmd_sn) & MASK
                    if ahead < self.window and sn_lt(ref_cmd_sn, cmd_sn) and ref_cmd_sn not in self.pending:
                        # RFC 7143 §11.5.1 b): never received, but issued before this TMF: its
                        # CmdSN counts as received (a late arrival is a duplicate), and done.
                        self._unqueue(ref_cmd_sn)
                        self._drain_pending()
                    else:
                        # Already answered (a), or not a command this session was sent.
                        response = TmfResponse.TASK_DOES_NOT_EXIST
        elif function in (TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET):
            if lun_no not in self.core.luns:
                response = TmfResponse.LUN_DOES_NOT_EXIST
            else:
                self.abort_tasks(lun_no)
        elif function == TmfFunction.LOGICAL_UNIT_RESET:
            if lun_no not in self.core.luns:
                response = TmfResponse.LUN_DOES_NOT_EXIST
            else:
                log.warning("%s: LOGICAL UNIT RESET of LUN %d", self.nexus, lun_no)
                self.core.lun_reset(lun_no, self)
        elif function == TmfFunction.TARGET_WARM_RESET:
            log.warning("%s: TARGET WARM RESET", self.nexus)
            self.core.target_warm_reset(self)
        elif function == TmfFunction.TASK_REASSIGN:
            response = TmfResponse.REASSIGNMENT_NOT_SUPPORTED
        else:  # CLEAR ACA (no NACA support), TARGET COLD RESET
            response = TmfResponse.NOT_SUPPORTED
        self._emit(self._pdu(Op.TASK_MGMT_RSP, F_FINAL, response, 0, 0, bytes(8), itt, 0))

    def abort_tasks(self, lun: int | None) -> None:
        """Abort this session's tasks (of one LUN, or all): no responses are sent for them."""
        for task in list(self.writes.values()):
            if lun is None or task.lun == lun:
                self._drop_write(task)
        for sn, p in list(self.pending.items()):
            if p is not None and p.opcode == Op.SCSI_CMD and (lun is None or decode_lun(p.bhs[8:16]) == lun):
                self._unqueue(sn)

    def _text(self, pdu: Pdu) -> None:
        bhs = pdu.bhs
        itt = pdu.itt
        self.text_buf += pdu.data
        if len(self.text_buf) > MAX_TEXT:
            self.text_buf.clear()
            self.reject(bhs, RejectReason.PROTOCOL_ERROR)
            return
        if bhs[1] & 0x40:  # C: more text follows; acknowledge with an empty response
            self._emit(self._pdu(Op.TEXT_RSP, 0, 0, 0, 0, bytes(8), itt, 0x7FFFFFFF))
            return
        try:
            pairs = parse_text(bytes(self.text_buf), strict=True)
        except ValueError:
            self.text_buf.clear()
            self.reject(bhs, RejectReason.PROTOCOL_ERROR)
            return
        self.text_buf.clear()
        answer: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                if value == "All" or value == self.core.target_name or (value == "" and not self.discovery):
                    answer.append(("TargetName", self.core.target_name))
                    answer.append(("TargetAddress", f"{self.portal or self.core.portal},{self.core.portal_group_tag}"))
            elif key == "MaxRecvDataSegmentLength":
                # Declarative, and may change in the full feature phase: it bounds our Data-In
                # segments from now on; we declare ours back, unchanged.
                try:
                    self.mrdsl = self.params.peer_max_recv_data_segment_length = number(key, value)
                except NegotiationError:
                    answer.append((key, "Reject"))
                    continue
                answer.append((key, str(self.params.max_recv_data_segment_length)))
            elif key == "InitiatorAlias":
                pass  # declarative, any phase: nothing to answer
            elif key in LOGIN_ONLY or key.startswith("CHAP_"):
                answer.append((key, "Irrelevant"))  # settled at login, not renegotiable now
            else:
                answer.append((key, "NotUnderstood"))
        data = encode_text(answer)
        self._emit(self._pdu(Op.TEXT_RSP, F_FINAL, 0, 0, len(data), bytes(8), itt, RESERVED_TAG), data)

    def _logout(self, pdu: Pdu) -> None:
        reason = pdu.bhs[1] & 0x7F
        response = 0 if reason in (0, 1) else 2  # 2: connection recovery not supported
        self.abort_tasks(None)
        self._emit(self._pdu(Op.LOGOUT_RSP, F_FINAL, response, 0, 0, bytes(8), pdu.itt, 0, w40=(self.params.default_time2wait << 16) | self.params.default_time2retain))
        if response == 0:
            self.closing = True

    def close(self) -> None:
        """The session is gone: its tasks are aborted; unless a reinstated session carries the
        I_T nexus on, the nexus is lost (its RESERVE(6) released, its unit attentions dropped)."""
        self.abort_tasks(None)
        self.core.sessions.discard(self)
        if self.nexus not in self.core.nexuses():
            for lun in self.core.luns.values():
                lun.nexus_lost(self.nexus)
