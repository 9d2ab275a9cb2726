"""A file-backed SBC-3 disk logical unit: the SCSI commands and their sense data.

Synchronous and sans-IO in spirit: `execute(cdb, data_out)` reads and writes the backing file with
pread/pwrite (page cache) and says, in the result, when the answer must wait for an fsync (FUA,
SYNCHRONIZE CACHE) — the trio driver does that fsync off the event loop.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from . import sense as S
from .scsi import PREFETCHES, READS, SAI_READ_CAPACITY_16, SYNCS, VERIFIES, WRITE_SAMES, WRITE_VERIFIES, WRITES, Opcode, decode_lba
from .sense import Sense, Status, illegal_request

VENDOR = b"NETSWAP "
PRODUCT = b"VIRTUAL-DISK    "
REVISION = b"0001"
MAX_TRANSFER_BYTES = 8 << 20  # VPD B0 MAXIMUM TRANSFER LENGTH, and the cap on one command's buffer
MAX_WRITE_SAME_BYTES = 64 << 20  # VPD B0 MAXIMUM WRITE SAME LENGTH, in bytes
MAX_COMPARE_AND_WRITE_BLOCKS = 128  # VPD B0 MAXIMUM COMPARE AND WRITE LENGTH


@dataclass
class ScsiResult:
    status: int = Status.GOOD
    data: bytes | bytearray | memoryview = b""
    sense: Sense | None = None
    sync: bool = False  # the response must wait until the backing file is fsync'ed


GOOD = ScsiResult()


def check(s: Sense) -> ScsiResult:
    return ScsiResult(Status.CHECK_CONDITION, b"", s)


def _alloc(data: bytes | bytearray, n: int) -> bytes | bytearray:
    return data[:n] if n < len(data) else data


def _dpo_fua(cdb: bytes) -> bool:
    return bool(cdb[1] & 0x08) if cdb[0] >> 5 else False


class DiskLun:
    """LUN `lun` backed by a regular file of `nblocks` blocks of `block_size` bytes."""

    def __init__(self, path: str | os.PathLike[str], *, block_size: int = 512, size: int | None = None, create: bool = True, lun: int = 0) -> None:
        if block_size not in (512, 1024, 2048, 4096):
            raise ValueError(f"block size {block_size} is not one of 512, 1024, 2048, 4096")
        self.path = Path(path)
        self.lun = lun
        self.block_size = block_size
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        self.fd = os.open(self.path, flags, 0o644)
        cur = os.fstat(self.fd).st_size
        if size is not None and cur < size:
            os.ftruncate(self.fd, size)
            cur = size
        if cur < block_size:
            os.close(self.fd)
            raise ValueError(f"{self.path}: size {cur} is smaller than one block ({block_size}); give --size")
        self.nblocks = cur // block_size
        ident = hashlib.sha1(str(self.path.resolve()).encode()).digest()
        self.serial = ident[:8].hex().encode()
        self.naa = bytes([0x60 | (ident[8] & 0x0F)]) + ident[9:24]  # NAA 6, 16 bytes
        self.reserved_by: object = None  # the I_T nexus holding a RESERVE(6), if any

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def fsync(self) -> None:
        os.fsync(self.fd)

    # --- the data-out phase, decided before any data is solicited -------------------------------

    def data_out_length(self, cdb: bytes) -> tuple[int, ScsiResult | None]:
        """Bytes of Data-Out the command wants (SPDTL), or an early answer (bad CDB, bad range)."""
        op = cdb[0]
        if op in WRITES or op in WRITE_VERIFIES:
            if cdb[1] & 0xE0 and op != Opcode.WRITE_6:
                return 0, check(illegal_request(S.INVALID_FIELD_IN_CDB))  # WRPROTECT: no protection info
            lba, n = decode_lba(cdb)
            bad = self._range(lba, n)
            if bad:
                return 0, bad
            return n * self.block_size, None
        if op in VERIFIES:
            if cdb[1] & 0xE0:
                return 0, check(illegal_request(S.INVALID_FIELD_IN_CDB))
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
            return 0, check(illegal_request(S.INVALID_FIELD_IN_CDB))
        if op == Opcode.COMPARE_AND_WRITE:
            bad = self._caw_check(cdb)
            if bad:
                return 0, bad
            return 2 * cdb[13] * self.block_size, None
        if op in WRITE_SAMES:
            bad = self._write_same_check(cdb)
            if bad:
                return 0, bad
            ndob = op == Opcode.WRITE_SAME_16 and cdb[1] & 0x01
            return (0 if ndob else self.block_size), None
        if op == Opcode.MODE_SELECT_6:
            return 0, check(illegal_request(S.INVALID_COMMAND_OPERATION_CODE))
        return 0, None

    def _caw_check(self, cdb: bytes) -> ScsiResult | None:
        if cdb[1] & 0xE0:  # WRPROTECT
            return check(illegal_request(S.INVALID_FIELD_IN_CDB, field_pointer=1))
        lba = struct.unpack_from(">Q", cdb, 2)[0]
        n = cdb[13]
        if n > MAX_COMPARE_AND_WRITE_BLOCKS:
            return check(illegal_request(S.INVALID_FIELD_IN_CDB, field_pointer=13))
        if lba + n > self.nblocks:
            return check(illegal_request(S.LBA_OUT_OF_RANGE))
        return None

    def compare_and_write(self, cdb: bytes, data_out: bytes | bytearray | memoryview) -> ScsiResult:
        """COMPARE AND WRITE (SBC-3 §5.2): atomic here, as every command runs to completion on
        the one event loop before the next starts."""
        early = self._caw_check(cdb)
        if early:
            return early
        lba = struct.unpack_from(">Q", cdb, 2)[0]
        n = cdb[13]
        if n == 0:
            return GOOD
        bs = self.block_size
        if len(data_out) != 2 * n * bs:
            return check(illegal_request(S.INVALID_FIELD_IN_INFORMATION_UNIT))
        medium = os.pread(self.fd, n * bs, lba * bs)
        verify = bytes(data_out[: n * bs])
        if medium != verify:
            first = next(i for i in range(len(medium)) if medium[i] != verify[i])
            return check(Sense(S.SenseKey.MISCOMPARE, *S.MISCOMPARE_DURING_VERIFY, information=first))
        os.pwrite(self.fd, data_out[n * bs :], lba * bs)
        return ScsiResult(sync=bool(cdb[1] & 0x08))

    def _write_same_check(self, cdb: bytes) -> ScsiResult | None:
        if cdb[1] & 0xF8:  # WRPROTECT; ANCHOR and UNMAP (fully provisioned: LBPME=0, no LBPWS)
            return check(illegal_request(S.INVALID_FIELD_IN_CDB, field_pointer=1))
        lba, n = decode_lba(cdb)
        if lba + n > self.nblocks:
            return check(illegal_request(S.LBA_OUT_OF_RANGE))
        if n == 0 or n * self.block_size > MAX_WRITE_SAME_BYTES:
            return check(illegal_request(S.INVALID_FIELD_IN_CDB))  # WSNZ is set in VPD B0
        return None

    def _range(self, lba: int, n: int) -> ScsiResult | None:
        if lba + n > self.nblocks:
            return check(illegal_request(S.LBA_OUT_OF_RANGE))
        if n * self.block_size > MAX_TRANSFER_BYTES:
            return check(illegal_request(S.INVALID_FIELD_IN_CDB))
        return None

    # --- execution ------------------------------------------------------------------------------

    def read(self, cdb: bytes) -> ScsiResult:
        """READ(6/10/12/16): the hot path."""
        lba, n = decode_lba(cdb)
        if cdb[0] != Opcode.READ_6 and cdb[1] & 0xE0:
            return check(illegal_request(S.INVALID_FIELD_IN_CDB))  # RDPROTECT
        bs = self.block_size
        if lba + n > self.nblocks:
            return check(illegal_request(S.LBA_OUT_OF_RANGE))
        if n * bs > MAX_TRANSFER_BYTES:
            return check(illegal_request(S.INVALID_FIELD_IN_CDB))
        if n == 0:
            return GOOD
        data = os.pread(self.fd, n * bs, lba * bs)
        if len(data) != n * bs:
            return check(Sense(S.SenseKey.MEDIUM_ERROR, *S.UNRECOVERED_READ_ERROR))
        return ScsiResult(Status.GOOD, data)

    def execute(self, cdb: bytes, data_out: bytes | bytearray | memoryview = b"") -> ScsiResult:
        op = cdb[0]
        if op in READS:
            return self.read(cdb)
        if op in WRITES or op in WRITE_VERIFIES:
            early = self.data_out_length(cdb)[1]
            if early:
                return early
            lba, n = decode_lba(cdb)
            if n == 0:
                return GOOD
            bs = self.block_size
            os.pwrite(self.fd, data_out[: n * bs], lba * bs)
            return ScsiResult(sync=_dpo_fua(cdb) or op in WRITE_VERIFIES)
        if op in VERIFIES:
            early = self.data_out_length(cdb)[1]
            if early:
                return early
            return self.verify(cdb, data_out)
        if op in WRITE_SAMES:
            early = self._write_same_check(cdb)
            if early:
                return early
            return self.write_same(cdb, data_out)
        if op == Opcode.COMPARE_AND_WRITE:
            return self.compare_and_write(cdb, data_out)
        if op in PREFETCHES:
            lba, n = decode_lba(cdb)
            if lba + n > self.nblocks:
                return check(illegal_request(S.LBA_OUT_OF_RANGE))
            return GOOD  # the page cache does the prefetching
        if op in SYNCS:
            lba, n = decode_lba(cdb)
            if lba + n > self.nblocks:
                return check(illegal_request(S.LBA_OUT_OF_RANGE))
            return ScsiResult(sync=True)
        handler = _HANDLERS.get(op)
        if handler is None:
            return check(illegal_request(S.INVALID_COMMAND_OPERATION_CODE))
        return handler(self, cdb)

    def write_same(self, cdb: bytes, data_out: bytes | bytearray | memoryview) -> ScsiResult:
        """WRITE SAME (10/16): one block replicated over the range (NDOB: zeros)."""
        lba, n = decode_lba(cdb)
        bs = self.block_size
        block = bytes(bs) if cdb[0] == Opcode.WRITE_SAME_16 and cdb[1] & 0x01 else bytes(data_out[:bs])
        if len(block) != bs:
            return check(illegal_request(S.INVALID_FIELD_IN_INFORMATION_UNIT))
        per = max(1, (1 << 20) // bs)
        chunk = block * per
        done = 0
        while done < n:
            k = min(per, n - done)
            os.pwrite(self.fd, chunk[: k * bs], (lba + done) * bs)
            done += k
        return ScsiResult()

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
        for i in range(len(medium)):
            if medium[i] != expect[i]:
                break
        return check(Sense(S.SenseKey.MISCOMPARE, *S.MISCOMPARE_DURING_VERIFY, information=i))

    # --- non-I/O commands -----------------------------------------------------------------------

    def test_unit_ready(self, cdb: bytes) -> ScsiResult:
        return GOOD

    def inquiry(self, cdb: bytes) -> ScsiResult:
        evpd = cdb[1] & 1
        page = cdb[2]
        alloc = struct.unpack_from(">H", cdb, 3)[0]
        if cdb[1] & 0xFE:
            return check(illegal_request(S.INVALID_FIELD_IN_CDB))
        if not evpd:
            if page:
                return check(illegal_request(S.INVALID_FIELD_IN_CDB))
            return ScsiResult(data=_alloc(self.standard_inquiry(), alloc))
        body = self.vpd(page)
        if body is None:
            return check(illegal_request(S.INVALID_FIELD_IN_CDB))
        return ScsiResult(data=_alloc(body, alloc))

    def standard_inquiry(self, qualifier: int = 0) -> bytes:
        b = bytearray(96)
        b[0] = qualifier << 5  # peripheral device type 0: direct access block device
        b[2] = 0x06  # SPC-4
        b[3] = 0x12  # HISUP, response data format 2
        b[4] = len(b) - 5
        b[7] = 0x02  # CMDQUE
        b[8:16] = VENDOR
        b[16:32] = PRODUCT
        b[32:36] = REVISION
        # version descriptors: SAM-5, iSCSI, SPC-4, SBC-3
        for i, v in enumerate((0x00A0, 0x0960, 0x0460, 0x04C0)):
            struct.pack_into(">H", b, 58 + 2 * i, v)
        return bytes(b)

    VPD_PAGES = (0x00, 0x80, 0x83, 0xB0, 0xB1)

    def vpd(self, page: int) -> bytes | None:
        if page == 0x00:
            body = bytes(self.VPD_PAGES)
        elif page == 0x80:
            body = self.serial
        elif page == 0x83:
            naa = bytes((0x01, 0x03, 0x00, len(self.naa))) + self.naa
            t10_id = VENDOR + self.serial
            t10 = bytes((0x02, 0x01, 0x00, len(t10_id))) + t10_id
            body = naa + t10
        elif page == 0xB0:
            b = bytearray(0x3C)
            # bytes relative to the page body (page offset - 4)
            struct.pack_into(">H", b, 2, 1)  # OPTIMAL TRANSFER LENGTH GRANULARITY
            struct.pack_into(">I", b, 4, MAX_TRANSFER_BYTES // self.block_size)  # MAXIMUM TRANSFER LENGTH
            struct.pack_into(">I", b, 8, (128 << 10) // self.block_size)  # OPTIMAL TRANSFER LENGTH
            b[0] = 0x01  # WSNZ: WRITE SAME with NUMBER OF LOGICAL BLOCKS 0 is not supported
            b[1] = MAX_COMPARE_AND_WRITE_BLOCKS  # MAXIMUM COMPARE AND WRITE LENGTH
            struct.pack_into(">Q", b, 32, MAX_WRITE_SAME_BYTES // self.block_size)  # MAXIMUM WRITE SAME LENGTH
            body = bytes(b)
        elif page == 0xB1:
            b = bytearray(0x3C)
            struct.pack_into(">H", b, 0, 1)  # MEDIUM ROTATION RATE: non-rotating
            body = bytes(b)
        else:
            return None
        return bytes((0x00, page)) + struct.pack(">H", len(body)) + body

    def read_capacity10(self, cdb: bytes) -> ScsiResult:
        if cdb[8] & 1 == 0 and any(cdb[2:6]):
            return check(illegal_request(S.INVALID_FIELD_IN_CDB))  # LBA set without PMI
        last = min(self.nblocks - 1, 0xFFFFFFFF)
        return ScsiResult(data=struct.pack(">II", last, self.block_size))

    def service_action_in(self, cdb: bytes) -> ScsiResult:
        if cdb[1] & 0x1F != SAI_READ_CAPACITY_16:
            return check(illegal_request(S.INVALID_FIELD_IN_CDB))
        alloc = struct.unpack_from(">I", cdb, 10)[0]
        b = bytearray(32)
        struct.pack_into(">QI", b, 0, self.nblocks - 1, self.block_size)
        return ScsiResult(data=_alloc(bytes(b), alloc))

    def mode_sense(self, cdb: bytes) -> ScsiResult:
        ten = cdb[0] == Opcode.MODE_SENSE_10
        dbd = cdb[1] & 0x08
        llbaa = ten and cdb[1] & 0x10
        pc = cdb[2] >> 6
        page = cdb[2] & 0x3F
        subpage = cdb[3]
        alloc = struct.unpack_from(">H", cdb, 7)[0] if ten else cdb[4]
        if pc == 3:
            return check(illegal_request(S.SAVING_PARAMETERS_NOT_SUPPORTED))
        if subpage not in (0x00, 0xFF):
            return check(illegal_request(S.INVALID_FIELD_IN_CDB))
        pages = self._mode_pages(pc == 1)
        if page == 0x3F:
            body = b"".join(pages.values())
        elif page in pages:
            body = pages[page]
        else:
            return check(illegal_request(S.INVALID_FIELD_IN_CDB))
        bd = b""
        if not dbd:
            if llbaa:
                bd = struct.pack(">QxxxxI", self.nblocks, self.block_size)
            else:
                bd = struct.pack(">II", min(self.nblocks, 0xFFFFFFFF), self.block_size & 0xFFFFFF)
        dev_specific = 0x10  # DPOFUA
        if ten:
            hdr_len = 8
            total = hdr_len + len(bd) + len(body)
            hdr = struct.pack(">HBBBxH", total - 2, 0, dev_specific, 0x01 if llbaa and bd else 0, len(bd))
        else:
            total = 4 + len(bd) + len(body)
            hdr = struct.pack(">BBBB", min(total - 1, 255), 0, dev_specific, len(bd))
        return ScsiResult(data=_alloc(hdr + bd + body, alloc))

    def _mode_pages(self, changeable: bool) -> dict[int, bytes]:
        caching = bytearray(20)
        caching[0], caching[1] = 0x08, 18
        control = bytearray(12)
        control[0], control[1] = 0x0A, 10
        iec = bytearray(12)
        iec[0], iec[1] = 0x1C, 10
        if not changeable:
            caching[2] = 0x04  # WCE: writes land in the page cache until FUA/SYNCHRONIZE CACHE
            control[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering allowed
            struct.pack_into(">H", control, 8, 0xFFFF)  # BUSY TIMEOUT PERIOD: unlimited
        return {0x08: bytes(caching), 0x0A: bytes(control), 0x1C: bytes(iec)}

    def request_sense(self, cdb: bytes) -> ScsiResult:
        if cdb[1] & 0x01:  # DESC: descriptor format
            data = bytes((0x72, 0, 0, 0, 0, 0, 0, 0))
        else:
            data = Sense(S.SenseKey.NO_SENSE, 0, 0).fixed()
        return ScsiResult(data=_alloc(data, cdb[4]))

    def maintenance_in(self, cdb: bytes) -> ScsiResult:
        if cdb[1] & 0x1F != SA_REPORT_SUPPORTED_OPCODES:
            return check(illegal_request(S.INVALID_FIELD_IN_CDB, field_pointer=1))
        return report_supported_opcodes(cdb)

    def start_stop_unit(self, cdb: bytes) -> ScsiResult:
        return GOOD  # not removable; power conditions are accepted and have no effect

    def prevent_allow(self, cdb: bytes) -> ScsiResult:
        return GOOD


_HANDLERS = {
    Opcode.TEST_UNIT_READY: DiskLun.test_unit_ready,
    Opcode.INQUIRY: DiskLun.inquiry,
    Opcode.READ_CAPACITY_10: DiskLun.read_capacity10,
    Opcode.SERVICE_ACTION_IN_16: DiskLun.service_action_in,
    Opcode.MODE_SENSE_6: DiskLun.mode_sense,
    Opcode.MODE_SENSE_10: DiskLun.mode_sense,
    Opcode.REQUEST_SENSE: DiskLun.request_sense,
    Opcode.START_STOP_UNIT: DiskLun.start_stop_unit,
    Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL: DiskLun.prevent_allow,
    Opcode.MAINTENANCE_IN: DiskLun.maintenance_in,
}

SA_REPORT_SUPPORTED_OPCODES = 0x0C
_FF4 = (0xFF,) * 4
# opcode -> (service action or None, CDB USAGE DATA: which CDB bits the device server looks at)
_USAGE: dict[tuple[int, int | None], bytes] = {
    (0x00, None): bytes((0x00, 0, 0, 0, 0, 0)),
    (0x03, None): bytes((0x03, 0x01, 0, 0, 0xFF, 0)),
    (0x08, None): bytes((0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0)),
    (0x0A, None): bytes((0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0)),
    (0x12, None): bytes((0x12, 0x01, 0xFF, 0xFF, 0xFF, 0)),
    (0x16, None): bytes((0x16, 0, 0, 0, 0, 0)),
    (0x17, None): bytes((0x17, 0, 0, 0, 0, 0)),
    (0x1A, None): bytes((0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0)),
    (0x1B, None): bytes((0x1B, 0x01, 0, 0x0F, 0xF7, 0)),
    (0x1E, None): bytes((0x1E, 0, 0, 0, 0x03, 0)),
    (0x25, None): bytes((0x25, 0, *_FF4, 0, 0, 0x01, 0)),
    (0x28, None): bytes((0x28, 0xF8, *_FF4, 0, 0xFF, 0xFF, 0)),
    (0x2A, None): bytes((0x2A, 0xF8, *_FF4, 0, 0xFF, 0xFF, 0)),
    (0x2E, None): bytes((0x2E, 0xF2, *_FF4, 0, 0xFF, 0xFF, 0)),
    (0x2F, None): bytes((0x2F, 0xF6, *_FF4, 0, 0xFF, 0xFF, 0)),
    (0x34, None): bytes((0x34, 0x02, *_FF4, 0, 0xFF, 0xFF, 0)),
    (0x35, None): bytes((0x35, 0, *_FF4, 0, 0xFF, 0xFF, 0)),
    (0x41, None): bytes((0x41, 0xE0, *_FF4, 0, 0xFF, 0xFF, 0)),
    (0x5A, None): bytes((0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0)),
    (0x88, None): bytes((0x88, 0xF8, *_FF4, *_FF4, *_FF4, 0, 0)),
    (0x89, None): bytes((0x89, 0xF8, *_FF4, *_FF4, 0, 0, 0, 0xFF, 0, 0)),
    (0x8A, None): bytes((0x8A, 0xF8, *_FF4, *_FF4, *_FF4, 0, 0)),
    (0x8E, None): bytes((0x8E, 0xF2, *_FF4, *_FF4, *_FF4, 0, 0)),
    (0x8F, None): bytes((0x8F, 0xF6, *_FF4, *_FF4, *_FF4, 0, 0)),
    (0x90, None): bytes((0x90, 0x02, *_FF4, *_FF4, *_FF4, 0, 0)),
    (0x91, None): bytes((0x91, 0, *_FF4, *_FF4, *_FF4, 0, 0)),
    (0x93, None): bytes((0x93, 0xE1, *_FF4, *_FF4, *_FF4, 0, 0)),
    (0x9E, 0x10): bytes((0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, *_FF4, 0, 0)),
    (0xA0, None): bytes((0xA0, 0, 0xFF, 0, 0, 0, *_FF4, 0, 0)),
    (0xA3, 0x0C): bytes((0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, *_FF4, 0, 0)),
    (0xA8, None): bytes((0xA8, 0xF8, *_FF4, *_FF4, 0, 0)),
    (0xAA, None): bytes((0xAA, 0xF8, *_FF4, *_FF4, 0, 0)),
    (0xAE, None): bytes((0xAE, 0xF2, *_FF4, *_FF4, 0, 0)),
    (0xAF, None): bytes((0xAF, 0xF6, *_FF4, *_FF4, 0, 0)),
}
_TIMEOUTS = struct.pack(">HxxII", 0x0A, 0, 0)  # command timeouts descriptor: no figures given


def report_supported_opcodes(cdb: bytes) -> ScsiResult:
    """REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35)."""
    rctd = bool(cdb[2] & 0x80)
    options = cdb[2] & 0x07
    req_op = cdb[3]
    req_sa = struct.unpack_from(">H", cdb, 4)[0]
    alloc = struct.unpack_from(">I", cdb, 6)[0]
    if options == 0:
        descs = []
        for (op, sa), usage in sorted(_USAGE.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            flags = (0x02 if rctd else 0) | (0x01 if sa is not None else 0)
            descs.append(struct.pack(">BxHxBH", op, sa or 0, flags, len(usage)) + (_TIMEOUTS if rctd else b""))
        body = b"".join(descs)
        return ScsiResult(data=_alloc(struct.pack(">I", len(body)) + body, alloc))
    has_sa = {op for (op, sa) in _USAGE if sa is not None}
    if options == 1:
        if req_op in has_sa:
            return check(illegal_request(S.INVALID_FIELD_IN_CDB, field_pointer=2))
        usage = _USAGE.get((req_op, None))
    elif options == 2:
        if req_op not in has_sa:
            return check(illegal_request(S.INVALID_FIELD_IN_CDB, field_pointer=2))
        usage = _USAGE.get((req_op, req_sa))
    elif options == 3:
        usage = _USAGE.get((req_op, req_sa if req_op in has_sa else None))
    else:
        return check(illegal_request(S.INVALID_FIELD_IN_CDB, field_pointer=2))
    if usage is None:
        data = bytes((0, 0x01, 0, 0))  # SUPPORT 001b: not supported
    else:
        data = bytes((0, (0x80 if rctd else 0) | 0x03)) + struct.pack(">H", len(usage)) + usage + (_TIMEOUTS if rctd else b"")
    return ScsiResult(data=_alloc(data, alloc))


def report_luns(luns: list[int], cdb: bytes) -> ScsiResult:
    """REPORT LUNS (SPC-4 §6.33), served for any addressed LUN."""
    select = cdb[2]
    alloc = struct.unpack_from(">I", cdb, 6)[0]
    if select not in (0, 1, 2) or alloc < 16:
        return check(illegal_request(S.INVALID_FIELD_IN_CDB))
    from .pdu import encode_lun

    entries = b"".join(encode_lun(n) for n in sorted(luns)) if select != 1 else b""
    data = struct.pack(">Ixxxx", len(entries)) + entries
    return ScsiResult(data=_alloc(data, alloc))


def no_such_lun(cdb: bytes, luns: list[int]) -> ScsiResult:
    """Commands addressed to a LUN that does not exist (SPC-4 §4.6.4)."""
    op = cdb[0]
    if op == Opcode.REPORT_LUNS:
        return report_luns(luns, cdb)
    if op == Opcode.INQUIRY:
        alloc = struct.unpack_from(">H", cdb, 3)[0]
        b = bytearray(36)
        b[0] = 0x7F  # qualifier 011b, type 1Fh: no logical unit here
        b[2], b[3], b[4] = 0x06, 0x02, 31
        b[8:16], b[16:32], b[32:36] = VENDOR, PRODUCT, REVISION
        return ScsiResult(data=_alloc(bytes(b), alloc))
    if op == Opcode.REQUEST_SENSE:
        return ScsiResult(data=_alloc(illegal_request(S.LOGICAL_UNIT_NOT_SUPPORTED).fixed(), cdb[4]))
    return check(illegal_request(S.LOGICAL_UNIT_NOT_SUPPORTED))
