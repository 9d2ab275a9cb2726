"""SCSI command set pieces shared by target and initiator: opcodes, CDB decoding and building."""

from __future__ import annotations

import enum
import struct


class Opcode(enum.IntEnum):
    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    RESERVE_6 = 0x16
    RELEASE_6 = 0x17
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    WRITE_AND_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    PRE_FETCH_10 = 0x34
    SYNCHRONIZE_CACHE_10 = 0x35
    READ_DEFECT_DATA_10 = 0x37
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    MODE_SELECT_10 = 0x55
    MODE_SENSE_10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    WRITE_16 = 0x8A
    ORWRITE_16 = 0x8B
    EXTENDED_COPY = 0x83
    RECEIVE_COPY_RESULTS = 0x84
    WRITE_AND_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    PRE_FETCH_16 = 0x90
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    MAINTENANCE_IN = 0xA3
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    WRITE_AND_VERIFY_12 = 0xAE
    VERIFY_12 = 0xAF
    READ_DEFECT_DATA_12 = 0xB7


SAI_READ_CAPACITY_16 = 0x10
SAI_GET_LBA_STATUS = 0x12

READS = frozenset({0x08, 0x28, 0xA8, 0x88})
WRITES = frozenset({0x0A, 0x2A, 0xAA, 0x8A})
WRITE_VERIFIES = frozenset({0x2E, 0xAE, 0x8E})
VERIFIES = frozenset({0x2F, 0xAF, 0x8F})
SYNCS = frozenset({0x35, 0x91})
PREFETCHES = frozenset({0x34, 0x90})
WRITE_SAMES = frozenset({0x41, 0x93})
MODE_SELECTS = frozenset({0x15, 0x55})
READ_DEFECT_DATAS = frozenset({0x37, 0xB7})
# Commands that change the medium: refused with DATA PROTECT while the LU is write protected.
MEDIUM_WRITES = WRITES | WRITE_VERIFIES | WRITE_SAMES | frozenset({0x42, 0x89, 0x8B})
# Commands that only read the medium (SPC-4 §5.12.2, SBC-3 table 13: allowed to any I_T nexus under
# a Write Exclusive reservation, in conflict under Exclusive Access).
MEDIUM_READS = READS | VERIFIES | PREFETCHES | READ_DEFECT_DATAS

_RW10 = struct.Struct(">xxIxH")
_RW12 = struct.Struct(">xxII")
_RW16 = struct.Struct(">xxQI")


def decode_lba(cdb: bytes | bytearray) -> tuple[int, int]:
    """(LBA, transfer length in blocks) of a 6/10/12/16-byte READ/WRITE/VERIFY/SYNC CDB."""
    op = cdb[0]
    group = op >> 5
    if group == 0:  # 6-byte: 21-bit LBA; transfer length 0 means 256 for READ/WRITE(6)
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        n = cdb[4] or 256
        return lba, n
    if group in (1, 2):
        return _RW10.unpack_from(cdb)
    if group == 5:
        return _RW12.unpack_from(cdb)
    if group == 4:
        return _RW16.unpack_from(cdb)
    raise ValueError(f"opcode 0x{op:02x} has no LBA")


# --- CDB builders (initiator side) ----------------------------------------------------------------


def cdb_read(lba: int, nblocks: int, *, fua: bool = False) -> bytes:
    if lba < (1 << 32) and nblocks < (1 << 16):
        return struct.pack(">BBIBHB", Opcode.READ_10, 0x08 if fua else 0, lba, 0, nblocks, 0)
    return struct.pack(">BBQIBB", Opcode.READ_16, 0x08 if fua else 0, lba, nblocks, 0, 0)


def cdb_write(lba: int, nblocks: int, *, fua: bool = False) -> bytes:
    if lba < (1 << 32) and nblocks < (1 << 16):
        return struct.pack(">BBIBHB", Opcode.WRITE_10, 0x08 if fua else 0, lba, 0, nblocks, 0)
    return struct.pack(">BBQIBB", Opcode.WRITE_16, 0x08 if fua else 0, lba, nblocks, 0, 0)


def cdb_synchronize_cache(lba: int = 0, nblocks: int = 0) -> bytes:
    if lba < (1 << 32) and nblocks < (1 << 16):
        return struct.pack(">BBIBHB", Opcode.SYNCHRONIZE_CACHE_10, 0, lba, 0, nblocks, 0)
    return struct.pack(">BBQIBB", Opcode.SYNCHRONIZE_CACHE_16, 0, lba, nblocks, 0, 0)


def cdb_read_capacity16(alloc: int = 32) -> bytes:
    return struct.pack(">BBQIBB", Opcode.SERVICE_ACTION_IN_16, SAI_READ_CAPACITY_16, 0, alloc, 0, 0)


def cdb_read_capacity10() -> bytes:
    return bytes((Opcode.READ_CAPACITY_10,)) + bytes(9)


def cdb_inquiry(alloc: int = 96, evpd: bool = False, page: int = 0) -> bytes:
    return struct.pack(">BBBHB", Opcode.INQUIRY, 1 if evpd else 0, page, alloc, 0)


def cdb_test_unit_ready() -> bytes:
    return bytes(6)


def cdb_report_luns(alloc: int = 4096) -> bytes:
    return struct.pack(">BBxxxxIxx", Opcode.REPORT_LUNS, 0, alloc)
