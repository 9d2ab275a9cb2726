"""Mode parameters of a disk LU (SPC-4 §7.5, SBC-3 §6.4): MODE SENSE(6/10) and MODE SELECT(6/10).

The pages are Caching (WCE: writes land in the page cache until FUA or SYNCHRONIZE CACHE),
Control and Informational Exceptions Control. One bit is changeable: SWP, software write protect, in
the Control page; while it is set every command that would change the medium ends with DATA
PROTECT. Saving parameters is not supported (no saved values; after a reset, defaults apply).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import sense as S
from .scsi import Opcode
from .sense import GOOD, ScsiResult, illegal

CACHING, CONTROL, INFORMATIONAL_EXCEPTIONS = 0x08, 0x0A, 0x1C
ALL_PAGES = 0x3F
CURRENT, CHANGEABLE, DEFAULT, SAVED = 0, 1, 2, 3
SWP = 0x08  # Control page byte 4
WP = 0x80  # device-specific parameter: write protected
DPOFUA = 0x10  # device-specific parameter: DPO and FUA supported


@dataclass
class ModeParameters:
    swp: bool = False

    def pages(self, pc: int) -> dict[int, bytes]:
        caching = bytearray(20)
        caching[0], caching[1] = CACHING, 18
        control = bytearray(12)
        control[0], control[1] = CONTROL, 10
        iec = bytearray(12)
        iec[0], iec[1] = INFORMATIONAL_EXCEPTIONS, 10
        if pc == CHANGEABLE:
            control[4] = SWP
        else:
            caching[2] = 0x04  # WCE
            control[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering allowed
            struct.pack_into(">H", control, 8, 0xFFFF)  # BUSY TIMEOUT PERIOD: unlimited
            if pc == CURRENT and self.swp:
                control[4] = SWP
        return {CACHING: bytes(caching), CONTROL: bytes(control), INFORMATIONAL_EXCEPTIONS: bytes(iec)}


def mode_sense(cdb: bytes, params: ModeParameters, nblocks: int, block_size: int) -> ScsiResult:
    ten = cdb[0] == Opcode.MODE_SENSE_10
    dbd = cdb[1] & 0x08
    llbaa = ten and cdb[1] & 0x10
    pc = cdb[2] >> 6
    page = cdb[2] & 0x3F
    subpage = cdb[3]
    alloc = struct.unpack_from(">H", cdb, 7)[0] if ten else cdb[4]
    if pc == SAVED:
        return illegal(S.SAVING_PARAMETERS_NOT_SUPPORTED)
    if subpage not in (0x00, 0xFF):
        return illegal(S.INVALID_FIELD_IN_CDB)
    pages = params.pages(pc)
    if page == ALL_PAGES:
        body = b"".join(pages.values())
    elif page in pages:
        body = pages[page]
    else:
        return illegal(S.INVALID_FIELD_IN_CDB)
    bd = b""
    if not dbd:
        if llbaa:
            bd = struct.pack(">QxxxxI", nblocks, block_size)
        else:
            bd = struct.pack(">II", min(nblocks, 0xFFFFFFFF), block_size & 0xFFFFFF)
    dev_specific = DPOFUA | (WP if params.swp else 0)
    if ten:
        total = 8 + len(bd) + len(body)
        hdr = struct.pack(">HBBBxH", total - 2, 0, dev_specific, 0x01 if llbaa and bd else 0, len(bd))
    else:
        total = 4 + len(bd) + len(body)
        hdr = struct.pack(">BBBB", min(total - 1, 255), 0, dev_specific, len(bd))
    data = hdr + bd + body
    return ScsiResult(data=data[:alloc])


def mode_select_length(cdb: bytes) -> int:
    return struct.unpack_from(">H", cdb, 7)[0] if cdb[0] == Opcode.MODE_SELECT_10 else cdb[4]


def mode_select(cdb: bytes, data: bytes | bytearray | memoryview, params: ModeParameters, nblocks: int,
                block_size: int) -> tuple[ScsiResult, bool]:
    """Apply a MODE SELECT parameter list; returns the result and whether anything changed.
    Any field that is not changeable must come back as MODE SENSE gave it."""
    ten = cdb[0] == Opcode.MODE_SELECT_10
    if cdb[1] & 0x01:  # SP: saving is not supported
        return illegal(S.INVALID_FIELD_IN_CDB, field_pointer=1), False
    data = bytes(data)
    if not data:
        return GOOD, False
    if not cdb[1] & 0x10:  # PF 0: a vendor-specific page format, which we do not have
        return illegal(S.INVALID_FIELD_IN_CDB, field_pointer=1), False
    hdr_len = 8 if ten else 4
    if len(data) < hdr_len:
        return illegal(S.PARAMETER_LIST_LENGTH_ERROR), False
    bd_len = struct.unpack_from(">H", data, 6)[0] if ten else data[3]
    long_lba = ten and data[4] & 0x01
    pos = hdr_len + bd_len
    if pos > len(data):
        return illegal(S.PARAMETER_LIST_LENGTH_ERROR), False
    bad_field = illegal(S.INVALID_FIELD_IN_PARAMETER_LIST)
    if bd_len:
        if bd_len != (16 if long_lba else 8):
            return bad_field, False
        if long_lba:
            blocks, length = struct.unpack_from(">QxxxxI", data, hdr_len)
        else:
            blocks, length = struct.unpack_from(">I", data, hdr_len)[0], int.from_bytes(data[hdr_len + 5 : hdr_len + 8], "big")
        if length != block_size or blocks not in (0, nblocks, min(nblocks, 0xFFFFFFFF)):
            return bad_field, False  # neither the capacity nor the block size can change
    current, changeable = params.pages(CURRENT), params.pages(CHANGEABLE)
    new_swp = params.swp
    while pos < len(data):
        if pos + 2 > len(data) or data[pos] & 0x40:  # truncated, or a subpage: none are offered
            return bad_field, False
        code, length = data[pos] & 0x3F, data[pos + 1]
        page = data[pos : pos + 2 + length]
        have = current.get(code)
        if have is None or len(page) != len(have):
            return bad_field, False
        mask = changeable[code]
        if any((page[i] ^ have[i]) & ~mask[i] for i in range(2, len(have))):
            return bad_field, False
        if code == CONTROL:
            new_swp = bool(page[4] & SWP)
        pos += 2 + length
    changed = new_swp != params.swp
    params.swp = new_swp
    return GOOD, changed
