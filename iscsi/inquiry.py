"""What a disk LU says about itself: INQUIRY and its VPD pages (SPC-4 §6.6, §7.8; SBC-3 §6.5),
REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35) and REPORT LUNS (SPC-4 §6.33)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cache

from . import sense as S
from .pdu import encode_lun
from .scsi import Opcode
from .sense import ScsiResult, illegal

VENDOR = b"NETSWAP "
PRODUCT = b"VIRTUAL-DISK    "
REVISION = b"0001"
MAX_TRANSFER_BYTES = 8 << 20  # VPD B0 MAXIMUM TRANSFER LENGTH, and the cap on one command's buffer
MAX_WRITE_SAME_BYTES = 16 << 20  # VPD B0 MAXIMUM WRITE SAME LENGTH, in bytes (a 16 MiB LU writes to its end)
MAX_COMPARE_AND_WRITE_BLOCKS = 128  # VPD B0 MAXIMUM COMPARE AND WRITE LENGTH
MAX_UNMAP_BYTES = 64 << 20  # VPD B0 MAXIMUM UNMAP LBA COUNT, in bytes
MAX_UNMAP_DESCRIPTORS = 1024  # VPD B0 MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
UNMAP_GRANULARITY_BYTES = 4096  # a page: what the filesystem can give back
VPD_PAGES = (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)
SA_REPORT_SUPPORTED_OPCODES = 0x0C


@dataclass(frozen=True)
class Identity:
    """The facts about an LU its pages report."""

    serial: bytes
    naa: bytes  # NAA 6 designator, 16 bytes
    block_size: int
    thin: bool


def inquiry(cdb: bytes, lu: Identity) -> ScsiResult:
    evpd = cdb[1] & 1
    page = cdb[2]
    alloc = struct.unpack_from(">H", cdb, 3)[0]
    if cdb[1] & 0xFE:
        return illegal(S.INVALID_FIELD_IN_CDB)
    if not evpd:
        if page:
            return illegal(S.INVALID_FIELD_IN_CDB)
        return ScsiResult(data=standard_inquiry()[:alloc])
    body = vpd(page, lu)
    if body is None:
        return illegal(S.INVALID_FIELD_IN_CDB)
    return ScsiResult(data=body[:alloc])


def standard_inquiry(qualifier: int = 0) -> bytes:
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


def vpd(page: int, lu: Identity) -> bytes | None:
    bs = lu.block_size
    if page == 0x00:
        body = bytes(VPD_PAGES)
    elif page == 0x80:
        body = lu.serial
    elif page == 0x83:
        naa = bytes((0x01, 0x03, 0x00, len(lu.naa))) + lu.naa
        t10_id = VENDOR + lu.serial
        t10 = bytes((0x02, 0x01, 0x00, len(t10_id))) + t10_id
        body = naa + t10
    elif page == 0xB0:  # Block Limits; offsets below are the page's minus 4
        b = bytearray(0x3C)
        b[0] = 0x00  # WSNZ 0: WRITE SAME of 0 blocks writes to the end of the LU
        b[1] = MAX_COMPARE_AND_WRITE_BLOCKS
        struct.pack_into(">H", b, 2, 1)  # OPTIMAL TRANSFER LENGTH GRANULARITY
        struct.pack_into(">I", b, 4, MAX_TRANSFER_BYTES // bs)  # MAXIMUM TRANSFER LENGTH
        struct.pack_into(">I", b, 8, (128 << 10) // bs)  # OPTIMAL TRANSFER LENGTH
        if lu.thin:
            struct.pack_into(">I", b, 16, MAX_UNMAP_BYTES // bs)  # MAXIMUM UNMAP LBA COUNT
            struct.pack_into(">I", b, 20, MAX_UNMAP_DESCRIPTORS)  # MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
            struct.pack_into(">I", b, 24, max(1, UNMAP_GRANULARITY_BYTES // bs))  # OPTIMAL UNMAP GRANULARITY
            struct.pack_into(">I", b, 28, 0x80000000)  # UGAVALID, UNMAP GRANULARITY ALIGNMENT 0
        struct.pack_into(">Q", b, 32, MAX_WRITE_SAME_BYTES // bs)  # MAXIMUM WRITE SAME LENGTH
        body = bytes(b)
    elif page == 0xB1:  # Block Device Characteristics
        b = bytearray(0x3C)
        struct.pack_into(">H", b, 0, 1)  # MEDIUM ROTATION RATE: non-rotating
        body = bytes(b)
    elif page == 0xB2:  # Logical Block Provisioning
        if lu.thin:  # LBPU, LBPWS, LBPWS10, LBPRZ; PROVISIONING TYPE 010b: thin
            body = bytes((0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0))
        else:
            body = bytes(4)  # fully provisioned
    else:
        return None
    return bytes((0x00, page)) + struct.pack(">H", len(body)) + body


# --- REPORT SUPPORTED OPERATION CODES -------------------------------------------------------------

_FF4 = (0xFF,) * 4


@cache
def _usage(thin: bool) -> dict[tuple[int, int | None], bytes]:
    """opcode, service action (or None) -> CDB USAGE DATA: the CDB bits the device server looks at."""
    usage: dict[tuple[int, int | None], bytes] = {
        (0x00, None): bytes((0x00, 0, 0, 0, 0, 0)),
        (0x03, None): bytes((0x03, 0x01, 0, 0, 0xFF, 0)),
        (0x08, None): bytes((0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0)),
        (0x0A, None): bytes((0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0)),
        (0x12, None): bytes((0x12, 0x01, 0xFF, 0xFF, 0xFF, 0)),
        (0x15, None): bytes((0x15, 0x11, 0, 0, 0xFF, 0)),
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
        (0x37, None): bytes((0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0)),
        (0x41, None): bytes((0x41, 0xE8 if thin else 0xE0, *_FF4, 0, 0xFF, 0xFF, 0)),
        (0x55, None): bytes((0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0)),
        (0x5A, None): bytes((0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0)),
        (0x88, None): bytes((0x88, 0xF8, *_FF4, *_FF4, *_FF4, 0, 0)),
        (0x89, None): bytes((0x89, 0xF8, *_FF4, *_FF4, 0, 0, 0, 0xFF, 0, 0)),
        (0x8A, None): bytes((0x8A, 0xF8, *_FF4, *_FF4, *_FF4, 0, 0)),
        (0x8B, None): bytes((0x8B, 0xF8, *_FF4, *_FF4, *_FF4, 0, 0)),
        (0x8E, None): bytes((0x8E, 0xF2, *_FF4, *_FF4, *_FF4, 0, 0)),
        (0x8F, None): bytes((0x8F, 0xF6, *_FF4, *_FF4, *_FF4, 0, 0)),
        (0x90, None): bytes((0x90, 0x02, *_FF4, *_FF4, *_FF4, 0, 0)),
        (0x91, None): bytes((0x91, 0, *_FF4, *_FF4, *_FF4, 0, 0)),
        (0x93, None): bytes((0x93, 0xE9 if thin else 0xE1, *_FF4, *_FF4, *_FF4, 0, 0)),
        (0x9E, 0x10): bytes((0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, *_FF4, 0, 0)),
        (0x9E, 0x12): bytes((0x9E, 0x12, *_FF4, *_FF4, *_FF4, 0, 0)),
        (0xA0, None): bytes((0xA0, 0, 0xFF, 0, 0, 0, *_FF4, 0, 0)),
        (0xA3, 0x0C): bytes((0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, *_FF4, 0, 0)),
        (0xA8, None): bytes((0xA8, 0xF8, *_FF4, *_FF4, 0, 0)),
        (0xAA, None): bytes((0xAA, 0xF8, *_FF4, *_FF4, 0, 0)),
        (0xAE, None): bytes((0xAE, 0xF2, *_FF4, *_FF4, 0, 0)),
        (0xAF, None): bytes((0xAF, 0xF6, *_FF4, *_FF4, 0, 0)),
        (0xB7, None): bytes((0xB7, 0x1F, 0, 0, 0, 0, *_FF4, 0, 0)),
    }
    usage[(0x83, 0x00)] = bytes((0x83, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0, *_FF4, 0, 0))  # EXTENDED COPY (LID1)
    for sa in (0x00, 0x03):  # RECEIVE COPY RESULTS: COPY STATUS, OPERATING PARAMETERS
        usage[(0x84, sa)] = bytes((0x84, 0x1F, 0xFF, 0, 0, 0, 0, 0, 0, 0, *_FF4, 0, 0))
    for sa in range(4):  # PERSISTENT RESERVE IN
        usage[(0x5E, sa)] = bytes((0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0))
    for sa in range(7):  # PERSISTENT RESERVE OUT (no REGISTER AND MOVE)
        usage[(0x5F, sa)] = bytes((0x5F, 0x1F, 0xFF, 0, 0, *_FF4, 0))
    if thin:
        usage[(0x42, None)] = bytes((0x42, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0))
    return usage


_TIMEOUTS = struct.pack(">HxxII", 0x0A, 0, 0)  # command timeouts descriptor: no figures given


def report_supported_opcodes(cdb: bytes, thin: bool) -> ScsiResult:
    if cdb[1] & 0x1F != SA_REPORT_SUPPORTED_OPCODES:
        return illegal(S.INVALID_FIELD_IN_CDB, field_pointer=1)
    usage_table = _usage(thin)
    rctd = bool(cdb[2] & 0x80)
    options = cdb[2] & 0x07
    req_op = cdb[3]
    req_sa = struct.unpack_from(">H", cdb, 4)[0]
    alloc = struct.unpack_from(">I", cdb, 6)[0]
    if options == 0:
        descs = []
        for (op, sa), cdb_usage in sorted(usage_table.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            flags = (0x02 if rctd else 0) | (0x01 if sa is not None else 0)
            descs.append(struct.pack(">BxHxBH", op, sa or 0, flags, len(cdb_usage)) + (_TIMEOUTS if rctd else b""))
        body = b"".join(descs)
        return ScsiResult(data=(struct.pack(">I", len(body)) + body)[:alloc])
    has_sa = {op for (op, sa) in usage_table if sa is not None}
    usage: bytes | None
    if options == 1:
        if req_op in has_sa:
            return illegal(S.INVALID_FIELD_IN_CDB, field_pointer=2)
        usage = usage_table.get((req_op, None))
    elif options == 2:
        if req_op not in has_sa:
            return illegal(S.INVALID_FIELD_IN_CDB, field_pointer=2)
        usage = usage_table.get((req_op, req_sa))
    elif options == 3:
        usage = usage_table.get((req_op, req_sa if req_op in has_sa else None))
    else:
        return illegal(S.INVALID_FIELD_IN_CDB, field_pointer=2)
    if usage is None:
        data = bytes((0, 0x01, 0, 0))  # SUPPORT 001b: not supported
    else:
        data = bytes((0, (0x80 if rctd else 0) | 0x03)) + struct.pack(">H", len(usage)) + usage + (_TIMEOUTS if rctd else b"")
    return ScsiResult(data=data[:alloc])


# --- REPORT LUNS, and commands for LUNs that do not exist ------------------------------------------


def report_luns(luns: list[int], cdb: bytes) -> ScsiResult:
    """REPORT LUNS, served for any addressed LUN."""
    select = cdb[2]
    alloc = struct.unpack_from(">I", cdb, 6)[0]
    if select not in (0, 1, 2) or alloc < 16:
        return illegal(S.INVALID_FIELD_IN_CDB)
    entries = b"".join(encode_lun(n) for n in sorted(luns)) if select != 1 else b""
    data = struct.pack(">Ixxxx", len(entries)) + entries
    return ScsiResult(data=data[:alloc])


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
        return ScsiResult(data=bytes(b)[:alloc])
    if op == Opcode.REQUEST_SENSE:
        return ScsiResult(data=S.illegal_request(S.LOGICAL_UNIT_NOT_SUPPORTED).fixed()[: cdb[4]])
    return illegal(S.LOGICAL_UNIT_NOT_SUPPORTED)
