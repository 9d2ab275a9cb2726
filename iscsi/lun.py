"""A file-backed SBC-3 disk logical unit: its commands, their sense data, and its per-LU state
(unit attentions, reservations, mode parameters).

Synchronous and sans-IO in spirit: `execute(cdb, data_out, nexus)` reads and writes the backing file
with pread/pwrite (page cache) and says, in the result, when the answer must wait for an fsync (FUA,
SYNCHRONIZE CACHE): the trio driver does that fsync off the event loop. `admit()` is what SAM-5
checks before a command may run at all: a pending UNIT ATTENTION, then a RESERVATION CONFLICT.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

from . import sense as S
from .inquiry import (
    MAX_COMPARE_AND_WRITE_BLOCKS,
    MAX_TRANSFER_BYTES,
    MAX_UNMAP_BYTES,
    MAX_UNMAP_DESCRIPTORS,
    MAX_WRITE_SAME_BYTES,
    Identity,
    inquiry,
    no_such_lun,
    report_luns,
    report_supported_opcodes,
)
from .libc import MEMORY_FILESYSTEMS, filesystem_type
from .mode import ModeParameters, mode_select, mode_select_length, mode_sense
from .nexus import Nexus
from .provisioning import DEALLOCATED, MAPPED, lba_status, punch_hole
from .reservations import Reservations
from .scsi import (
    MEDIUM_WRITES,
    MODE_SELECTS,
    PREFETCHES,
    READ_DEFECT_DATAS,
    READS,
    SAI_GET_LBA_STATUS,
    SAI_READ_CAPACITY_16,
    SYNCS,
    VERIFIES,
    WRITE_SAMES,
    WRITE_VERIFIES,
    WRITES,
    Opcode,
    decode_lba,
)
from .sense import GOOD, ScsiResult, Sense, Status, check, illegal
from .ua import UnitAttentions
from .xcopy import CopyManager

__all__ = ["BLOCK_SIZES", "DiskLun", "LOCAL", "MAX_TRANSFER_BYTES", "ScsiResult", "no_such_lun", "report_luns"]

BLOCK_SIZES = (512, 1024, 2048, 4096)
LOCAL = Nexus("local", bytes(6))  # the I_T nexus of a caller that is not a session (tests, tools)
# Commands a pending UNIT ATTENTION does not stop (SPC-4 §5.14); REQUEST SENSE reports it.
UA_EXEMPT = frozenset({Opcode.INQUIRY, Opcode.REPORT_LUNS, Opcode.REQUEST_SENSE})
WRITE_PROTECTED = check(Sense(S.SenseKey.DATA_PROTECT, *S.SOFTWARE_WRITE_PROTECTED))


def _dpo_fua(cdb: bytes) -> bool:
    return bool(cdb[1] & 0x08) if cdb[0] >> 5 else False


class DiskLun:
    """LUN `lun` backed by a regular file: `size` bytes (the file is grown to it, never shrunk),
    else the file's size, in blocks of `block_size` bytes. `thin`: UNMAP and WRITE SAME with UNMAP
    punch holes in the file."""

    def __init__(self, path: str | os.PathLike[str], *, block_size: int = 512, size: int | None = None,
                 create: bool = True, lun: int = 0, thin: bool = False) -> None:
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block size {block_size} is not one of {', '.join(map(str, BLOCK_SIZES))}")
        if size is not None and (size < block_size or size % block_size):
            raise ValueError(f"size {size} is not a whole number (at least 1) of {block_size}-byte blocks")
        self.path = Path(path)
        self.lun = lun
        self.block_size = block_size
        self.thin = thin
        self.fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        try:
            cur = os.fstat(self.fd).st_size
            if size is not None:
                if cur < size:
                    os.ftruncate(self.fd, size)
                cur = size
            if cur < block_size:
                raise ValueError(f"{self.path}: size {cur} is smaller than one block ({block_size}); give --size")
        except BaseException:
            os.close(self.fd)
            raise
        self.nblocks = cur // block_size
        ident = hashlib.sha256(str(self.path.resolve()).encode()).digest()
        # NAA 6 (IEEE registered extended): 16 bytes, from the file's path, stable across restarts
        self.identity = Identity(serial=ident[:8].hex().encode(), naa=bytes([0x60 | (ident[8] & 0x0F)]) + ident[9:24],
                                 block_size=block_size, thin=thin)
        # In memory (tmpfs) an fsync has nothing to write and takes microseconds: the target
        # does it inline rather than in a worker thread, which would cost more than the fsync.
        self.fast_sync = filesystem_type(self.fd) in MEMORY_FILESYSTEMS
        self.mode = ModeParameters()
        self.ua = UnitAttentions()
        self.reservations = Reservations(self.ua.establish)
        # Set by the target: the I_T nexuses logged in now, how to abort a nexus's tasks, and the
        # copy manager that knows all of its LUs.
        self.logged_in: Callable[[], Iterable[Nexus]] = lambda: ()
        self.abort_tasks_of: Callable[[list[Nexus]], None] = lambda nexuses: None
        self.copy_manager = CopyManager(lambda: (self,))

    @property
    def serial(self) -> bytes:
        return self.identity.serial

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def fsync(self) -> None:
        os.fdatasync(self.fd)  # the data, and the metadata needed to read it back

    # --- before a command runs --------------------------------------------------------------------

    def admit(self, nexus: Nexus, cdb: bytes) -> ScsiResult | None:
        """A pending UNIT ATTENTION, then a RESERVATION CONFLICT; None: the command may run."""
        if self.ua and cdb[0] not in UA_EXEMPT:
            sense = self.ua.take(nexus)
            if sense is not None:
                return check(sense)
        if self.reservations and self.reservations.conflict(nexus, cdb):
            return S.RESERVATION_CONFLICT
        return None

    def reset(self, condition: tuple[int, int]) -> None:
        """LOGICAL UNIT RESET or TARGET WARM RESET (SAM-5 §6.3): RESERVE(6) released, mode
        parameters back to their defaults, a UNIT ATTENTION for every I_T nexus."""
        self.reservations.reset()
        self.mode = ModeParameters()
        self.ua.establish(self.logged_in(), condition)

    def nexus_lost(self, nexus: Nexus) -> None:
        self.reservations.nexus_lost(nexus)
        self.ua.forget(nexus)

    # --- the data-out phase, decided before any data is solicited -------------------------------

    def data_out_length(self, cdb: bytes) -> tuple[int, ScsiResult | None]:
        """Bytes of Data-Out the command wants (SPDTL), or an early answer (bad CDB, bad range,
        write protected)."""
        op = cdb[0]
        n_bytes, early = self._data_out_length(cdb)
        if early is None and self.mode.swp and op in MEDIUM_WRITES:
            return 0, WRITE_PROTECTED
        return n_bytes, early

    def _data_out_length(self, cdb: bytes) -> tuple[int, ScsiResult | None]:
        op = cdb[0]
        if op in WRITES or op in WRITE_VERIFIES or op == Opcode.ORWRITE_16:
            if cdb[1] & 0xE0 and op != Opcode.WRITE_6:
                return 0, illegal(S.INVALID_FIELD_IN_CDB)  # WRPROTECT/ORPROTECT: no protection info
            lba, n = decode_lba(cdb)
            return n * self.block_size, self._range(lba, n)
        if op in VERIFIES:
            if cdb[1] & 0xE0:
                return 0, illegal(S.INVALID_FIELD_IN_CDB)
            lba, n = decode_lba(cdb)
            bad = self._range(lba, n)
            if bad:
                return 0, bad
            bytchk = (cdb[1] >> 1) & 3
            if bytchk == 0 or n == 0:
                return 0, None
            if bytchk == 1:
                return n * self.block_size, None
            if bytchk == 3:
                return self.block_size, None
            return 0, illegal(S.INVALID_FIELD_IN_CDB)
        if op == Opcode.COMPARE_AND_WRITE:
            bad = self._caw_check(cdb)
            return (0, bad) if bad else (2 * cdb[13] * self.block_size, None)
        if op in WRITE_SAMES:
            bad = self._write_same_range(cdb)[1]
            if bad:
                return 0, bad
            ndob = op == Opcode.WRITE_SAME_16 and cdb[1] & 0x01
            return (0 if ndob else self.block_size), None
        if op == Opcode.UNMAP:
            if not self.thin:
                return 0, illegal(S.INVALID_COMMAND_OPERATION_CODE)
            if cdb[1] & 0x01:  # ANCHOR: ANC_SUP is 0
                return 0, illegal(S.INVALID_FIELD_IN_CDB, field_pointer=1)
            return struct.unpack_from(">H", cdb, 7)[0], None
        if op in MODE_SELECTS:
            return mode_select_length(cdb), None
        if op == Opcode.PERSISTENT_RESERVE_OUT:
            return struct.unpack_from(">I", cdb, 5)[0], None
        if op == Opcode.EXTENDED_COPY:
            return struct.unpack_from(">I", cdb, 10)[0], None
        return 0, None

    def _range(self, lba: int, n: int) -> ScsiResult | None:
        if lba + n > self.nblocks:
            return illegal(S.LBA_OUT_OF_RANGE)
        if n * self.block_size > MAX_TRANSFER_BYTES:
            return illegal(S.INVALID_FIELD_IN_CDB)
        return None

    def _caw_check(self, cdb: bytes) -> ScsiResult | None:
        if cdb[1] & 0xE0:  # WRPROTECT
            return illegal(S.INVALID_FIELD_IN_CDB, field_pointer=1)
        lba = struct.unpack_from(">Q", cdb, 2)[0]
        n = cdb[13]
        if n > MAX_COMPARE_AND_WRITE_BLOCKS:
            return illegal(S.INVALID_FIELD_IN_CDB, field_pointer=13)
        if lba + n > self.nblocks:
            return illegal(S.LBA_OUT_OF_RANGE)
        return None

    def _write_same_range(self, cdb: bytes) -> tuple[tuple[int, int], ScsiResult | None]:
        """(LBA, blocks) of a WRITE SAME, with 0 blocks meaning "to the end of the LU" (WSNZ 0)."""
        flags = cdb[1]
        sixteen = cdb[0] == Opcode.WRITE_SAME_16
        allowed = 0x08 if self.thin else 0  # UNMAP, with LBPWS/LBPWS10
        if sixteen:
            allowed |= 0x01  # NDOB
        if flags & ~allowed & 0xFF:  # WRPROTECT (no protection info), ANCHOR (ANC_SUP 0), ...
            return (0, 0), illegal(S.INVALID_FIELD_IN_CDB, field_pointer=1)
        lba, n = decode_lba(cdb)
        if lba >= self.nblocks or lba + n > self.nblocks:
            return (lba, n), illegal(S.LBA_OUT_OF_RANGE)
        if n == 0:
            n = self.nblocks - lba
        if n * self.block_size > MAX_WRITE_SAME_BYTES:
            return (lba, n), illegal(S.INVALID_FIELD_IN_CDB)
        return (lba, n), None

    # --- execution ------------------------------------------------------------------------------

    def read(self, cdb: bytes) -> ScsiResult:
        """READ(6/10/12/16)."""
        lba, n = decode_lba(cdb)
        if cdb[0] != Opcode.READ_6 and cdb[1] & 0xE0:
            return illegal(S.INVALID_FIELD_IN_CDB)  # RDPROTECT
        bad = self._range(lba, n)
        if bad:
            return bad
        if n == 0:
            return GOOD
        bs = self.block_size
        data = os.pread(self.fd, n * bs, lba * bs)
        if len(data) != n * bs:
            return check(Sense(S.SenseKey.MEDIUM_ERROR, *S.UNRECOVERED_READ_ERROR))
        return ScsiResult(Status.GOOD, data)

    def execute(self, cdb: bytes, data_out: bytes | bytearray | memoryview = b"", nexus: Nexus = LOCAL) -> ScsiResult:
        op = cdb[0]
        if op in READS:
            return self.read(cdb)
        if op in MEDIUM_WRITES or op in VERIFIES:
            early = self.data_out_length(cdb)[1]
            if early:
                return early
            if op in WRITES or op in WRITE_VERIFIES:
                return self.write(cdb, data_out)
            if op in VERIFIES:
                return self.verify(cdb, data_out)
            if op in WRITE_SAMES:
                return self.write_same(cdb, data_out)
            if op == Opcode.ORWRITE_16:
                return self.orwrite(cdb, data_out)
            if op == Opcode.UNMAP:
                return self.unmap(data_out)
            return self.compare_and_write(cdb, data_out)
        if op in PREFETCHES or op in SYNCS:
            lba, n = decode_lba(cdb)
            if lba + n > self.nblocks:
                return illegal(S.LBA_OUT_OF_RANGE)
            return ScsiResult(sync=op in SYNCS)  # the page cache does the prefetching
        if op == Opcode.INQUIRY:
            return inquiry(cdb, self.identity)
        if op == Opcode.TEST_UNIT_READY or op == Opcode.START_STOP_UNIT or op == Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL:
            return GOOD  # not removable; power conditions are accepted and have no effect
        if op == Opcode.READ_CAPACITY_10:
            return self.read_capacity10(cdb)
        if op == Opcode.SERVICE_ACTION_IN_16:
            return self.service_action_in(cdb)
        if op in (Opcode.MODE_SENSE_6, Opcode.MODE_SENSE_10):
            return mode_sense(cdb, self.mode, self.nblocks, self.block_size)
        if op in MODE_SELECTS:
            res, changed = mode_select(cdb, data_out, self.mode, self.nblocks, self.block_size)
            if changed:  # SPC-4 §5.14: every other I_T nexus hears of it
                self.ua.establish([n for n in self.logged_in() if n != nexus], S.MODE_PARAMETERS_CHANGED)
            return res
        if op == Opcode.REQUEST_SENSE:
            return self.request_sense(cdb, nexus)
        if op == Opcode.MAINTENANCE_IN:
            return report_supported_opcodes(cdb, self.thin)
        if op == Opcode.RESERVE_6:
            return self.reservations.reserve6(nexus)
        if op == Opcode.RELEASE_6:
            return self.reservations.release6(nexus)
        if op == Opcode.PERSISTENT_RESERVE_IN:
            return self.reservations.persistent_reserve_in(cdb)
        if op == Opcode.PERSISTENT_RESERVE_OUT:
            res, preempted = self.reservations.persistent_reserve_out(nexus, cdb, data_out)
            if preempted and cdb[1] & 0x1F == 0x05:  # PREEMPT AND ABORT
                self.abort_tasks_of(preempted)
            return res
        if op == Opcode.EXTENDED_COPY:
            return self.copy_manager.extended_copy(nexus, cdb, data_out)
        if op == Opcode.RECEIVE_COPY_RESULTS:
            return self.copy_manager.receive_copy_results(nexus, cdb)
        if op in READ_DEFECT_DATAS:
            return self.read_defect_data(cdb)
        if op == Opcode.REPORT_LUNS:
            return report_luns([self.lun], cdb)
        return illegal(S.INVALID_COMMAND_OPERATION_CODE)

    def write(self, cdb: bytes, data_out: bytes | bytearray | memoryview) -> ScsiResult:
        lba, n = decode_lba(cdb)
        if n:
            bs = self.block_size
            os.pwrite(self.fd, data_out[: n * bs], lba * bs)
        return ScsiResult(sync=_dpo_fua(cdb) or cdb[0] in WRITE_VERIFIES)

    def orwrite(self, cdb: bytes, data_out: bytes | bytearray | memoryview) -> ScsiResult:
        """ORWRITE(16) (SBC-3 §5.8): the medium becomes medium OR data."""
        lba, n = decode_lba(cdb)
        if n:
            bs = self.block_size
            size = n * bs
            medium = int.from_bytes(os.pread(self.fd, size, lba * bs), "big")
            new = medium | int.from_bytes(data_out[:size], "big")
            os.pwrite(self.fd, new.to_bytes(size, "big"), lba * bs)
        return ScsiResult(sync=_dpo_fua(cdb))

    def compare_and_write(self, cdb: bytes, data_out: bytes | bytearray | memoryview) -> ScsiResult:
        """COMPARE AND WRITE (SBC-3 §5.2): atomic here, as every command runs to completion on
        the one event loop before the next starts."""
        lba = struct.unpack_from(">Q", cdb, 2)[0]
        n = cdb[13]
        if n == 0:
            return GOOD
        bs = self.block_size
        if len(data_out) != 2 * n * bs:
            return illegal(S.INVALID_FIELD_IN_INFORMATION_UNIT)
        medium = os.pread(self.fd, n * bs, lba * bs)
        verify = bytes(data_out[: n * bs])
        if medium != verify:
            first = next(i for i in range(len(medium)) if medium[i] != verify[i])
            return check(Sense(S.SenseKey.MISCOMPARE, *S.MISCOMPARE_DURING_VERIFY, information=first))
        os.pwrite(self.fd, data_out[n * bs :], lba * bs)
        return ScsiResult(sync=bool(cdb[1] & 0x08))

    def write_same(self, cdb: bytes, data_out: bytes | bytearray | memoryview) -> ScsiResult:
        """WRITE SAME (10/16): one block over the range (NDOB: zeros). With UNMAP on a thin LU the
        range is unmapped instead, whatever the block (SBC-3 §5.43); LBPRZ: it reads as zeros."""
        (lba, n), bad = self._write_same_range(cdb)
        if bad:
            return bad
        bs = self.block_size
        ndob = cdb[0] == Opcode.WRITE_SAME_16 and cdb[1] & 0x01
        block = bytes(bs) if ndob else bytes(data_out[:bs])
        if len(block) != bs:
            return illegal(S.INVALID_FIELD_IN_INFORMATION_UNIT)
        if cdb[1] & 0x08:
            punch_hole(self.fd, lba * bs, n * bs)
            return GOOD
        per = max(1, (1 << 20) // bs)
        chunk = block * min(per, n)
        done = 0
        while done < n:
            k = min(per, n - done)
            os.pwrite(self.fd, chunk[: k * bs], (lba + done) * bs)
            done += k
        return GOOD

    def unmap(self, params: bytes | bytearray | memoryview) -> ScsiResult:
        """UNMAP (SBC-3 §5.28): every range is checked before any is unmapped."""
        if not params:
            return GOOD
        if len(params) < 8:
            return illegal(S.PARAMETER_LIST_LENGTH_ERROR)
        bddl = struct.unpack_from(">H", params, 2)[0]
        count = min(bddl, len(params) - 8) // 16
        if count > MAX_UNMAP_DESCRIPTORS:
            return illegal(S.INVALID_FIELD_IN_PARAMETER_LIST)
        ranges = [struct.unpack_from(">QI", params, 8 + 16 * i) for i in range(count)]
        total = 0
        for lba, n in ranges:
            if lba + n > self.nblocks:
                return illegal(S.LBA_OUT_OF_RANGE)
            total += n
        if total * self.block_size > MAX_UNMAP_BYTES:
            return illegal(S.INVALID_FIELD_IN_PARAMETER_LIST)
        bs = self.block_size
        for lba, n in ranges:
            punch_hole(self.fd, lba * bs, n * bs)
        return GOOD

    def verify(self, cdb: bytes, data_out: bytes | bytearray | memoryview) -> ScsiResult:
        lba, n = decode_lba(cdb)
        bytchk = (cdb[1] >> 1) & 3
        if bytchk == 0 or n == 0:
            return GOOD
        bs = self.block_size
        medium = os.pread(self.fd, n * bs, lba * bs)
        expect = bytes(data_out) if bytchk == 1 else bytes(data_out[:bs]) * n
        medium = medium[: len(expect)]  # EDTL shorter than the CDB asks: compare what came
        if medium == expect:
            return GOOD
        first = next(i for i in range(len(medium)) if medium[i] != expect[i])
        return check(Sense(S.SenseKey.MISCOMPARE, *S.MISCOMPARE_DURING_VERIFY, information=first))

    # --- non-I/O commands -----------------------------------------------------------------------

    def read_capacity10(self, cdb: bytes) -> ScsiResult:
        if cdb[8] & 1 == 0 and any(cdb[2:6]):
            return illegal(S.INVALID_FIELD_IN_CDB)  # LBA set without PMI
        last = min(self.nblocks - 1, 0xFFFFFFFF)
        return ScsiResult(data=struct.pack(">II", last, self.block_size))

    def service_action_in(self, cdb: bytes) -> ScsiResult:
        sa = cdb[1] & 0x1F
        alloc = struct.unpack_from(">I", cdb, 10)[0]
        if sa == SAI_READ_CAPACITY_16:
            b = bytearray(32)
            struct.pack_into(">QI", b, 0, self.nblocks - 1, self.block_size)
            if self.thin:
                b[14] = 0x80 | 0x40  # LBPME, LBPRZ
            return ScsiResult(data=bytes(b)[:alloc])
        if sa == SAI_GET_LBA_STATUS:
            return self.get_lba_status(cdb)
        return illegal(S.INVALID_FIELD_IN_CDB, field_pointer=1)

    def get_lba_status(self, cdb: bytes) -> ScsiResult:
        """GET LBA STATUS (SBC-3 §5.6): mapped and deallocated extents from the starting LBA."""
        lba = struct.unpack_from(">Q", cdb, 2)[0]
        alloc = struct.unpack_from(">I", cdb, 10)[0]
        if lba >= self.nblocks:
            return illegal(S.LBA_OUT_OF_RANGE)
        most = max(1, min(256, (alloc - 8) // 16))
        if self.thin:
            extents = lba_status(self.fd, lba, self.nblocks, self.block_size, most)
        else:
            extents = [(lba, min(self.nblocks - lba, 0xFFFFFFFF), MAPPED)]
        body = b"".join(struct.pack(">QIBxxx", first, count, DEALLOCATED if status else MAPPED)
                        for first, count, status in extents)
        return ScsiResult(data=(struct.pack(">Ixxxx", 4 + len(body)) + body)[:alloc])

    def request_sense(self, cdb: bytes, nexus: Nexus) -> ScsiResult:
        """The pending UNIT ATTENTION, if any (reporting clears it), else NO SENSE."""
        sense = self.ua.take(nexus) if self.ua else None
        if sense is None:
            sense = Sense(S.SenseKey.NO_SENSE, 0, 0)
        if cdb[1] & 0x01:  # DESC: descriptor format
            data = bytes((0x72, sense.key, sense.asc, sense.ascq, 0, 0, 0, 0))
        else:
            data = sense.fixed()
        return ScsiResult(data=data[: cdb[4]])

    def read_defect_data(self, cdb: bytes) -> ScsiResult:
        """READ DEFECT DATA (10/12): a file has no defects; the lists asked for are valid and empty."""
        if cdb[0] == Opcode.READ_DEFECT_DATA_10:
            lists = cdb[2] & 0x1F
            alloc = struct.unpack_from(">H", cdb, 7)[0]
            data = struct.pack(">BBH", 0, lists, 0)
        else:
            lists = cdb[1] & 0x1F
            alloc = struct.unpack_from(">I", cdb, 6)[0]
            data = struct.pack(">BBHI", 0, lists, 0, 0)
        return ScsiResult(data=data[:alloc])

