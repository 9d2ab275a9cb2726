"""The copy manager: EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 §6.4, §6.27), sans-IO.

Block-to-block segments between the target's own LUs, each named by an identification target
descriptor (0xE4) carrying the LU's NAA designator from VPD page 0x83. A copy runs to completion
before the command is answered (one copy at a time; no held data, no inline data). Its status is
kept per I_T nexus and list identifier when the LIST ID USAGE asks for it.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from . import sense as S
from .nexus import Nexus
from .sense import GOOD, ScsiResult, Sense, SenseKey, check, illegal

if TYPE_CHECKING:
    from .lun import DiskLun

HEADER = 16  # the parameter list header
TARGET_DESCRIPTOR = 0xE4, 32  # identification descriptor target descriptor, its length
BLOCK_TO_BLOCK = 0x02, 28  # block device to block device segment descriptor, its length
MAX_TARGET_DESCRIPTORS = 2
MAX_SEGMENT_DESCRIPTORS = 16
MAX_DESCRIPTOR_LIST_LENGTH = 1024
MAX_SEGMENT_BYTES = 32 << 20
HELD_STATUSES = 64

SA_EXTENDED_COPY_LID1 = 0x00
SA_COPY_STATUS, SA_OPERATING_PARAMETERS = 0x00, 0x03

TOO_MANY_TARGET_DESCRIPTORS = (0x26, 0x06)
UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE = (0x26, 0x07)
TOO_MANY_SEGMENT_DESCRIPTORS = (0x26, 0x08)
UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE = (0x26, 0x09)
UNREACHABLE_COPY_TARGET = (0x08, 0x04)


def copy_aborted(asc: tuple[int, int] = S.NO_ADDITIONAL_SENSE) -> ScsiResult:
    return check(Sense(SenseKey.COPY_ABORTED, *asc))


class CopyManager:
    """Copies between the LUs `luns()` returns (the target's, or one LU's own)."""

    def __init__(self, luns: Callable[[], Iterable[DiskLun]]) -> None:
        self.luns = luns
        self.statuses: OrderedDict[tuple[Nexus, int], tuple[int, int]] = OrderedDict()  # -> segments, bytes

    def extended_copy(self, nexus: Nexus, cdb: bytes, params: bytes | bytearray | memoryview) -> ScsiResult:
        if cdb[1] & 0x1F != SA_EXTENDED_COPY_LID1:
            return illegal(S.INVALID_FIELD_IN_CDB, field_pointer=1)
        params = bytes(params)
        if not params:
            return GOOD  # nothing to copy
        if len(params) < HEADER:
            return illegal(S.PARAMETER_LIST_LENGTH_ERROR)
        list_id, flags, tdl, sdl, inline = struct.unpack_from(">BBHxxxxII", params)
        if HEADER + tdl + sdl + inline > len(params) or tdl + sdl > MAX_DESCRIPTOR_LIST_LENGTH:
            return illegal(S.PARAMETER_LIST_LENGTH_ERROR)
        if inline:
            return illegal(S.INVALID_FIELD_IN_PARAMETER_LIST)  # no inline data
        targets: list[DiskLun | None] = []
        pos = HEADER
        while pos < HEADER + tdl:
            if len(targets) == MAX_TARGET_DESCRIPTORS:
                return illegal(TOO_MANY_TARGET_DESCRIPTORS)
            if params[pos] != TARGET_DESCRIPTOR[0]:
                return illegal(UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE)
            targets.append(self._target(params[pos : pos + TARGET_DESCRIPTOR[1]]))
            pos += TARGET_DESCRIPTOR[1]
        segments: list[tuple[int, int, int, int, int]] = []
        end = HEADER + tdl + sdl
        while pos < end:
            code, length = params[pos], struct.unpack_from(">H", params, pos + 2)[0]
            if len(segments) == MAX_SEGMENT_DESCRIPTORS:
                return illegal(TOO_MANY_SEGMENT_DESCRIPTORS)
            if code != BLOCK_TO_BLOCK[0]:
                return illegal(UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE)
            if length + 4 != BLOCK_TO_BLOCK[1] or pos + BLOCK_TO_BLOCK[1] > end:
                return illegal(S.PARAMETER_LIST_LENGTH_ERROR)
            src, dst, blocks, src_lba, dst_lba = struct.unpack_from(">HHxxHQQ", params, pos + 4)
            segments.append((src, dst, blocks, src_lba, dst_lba))
            pos += BLOCK_TO_BLOCK[1]
        done = copied = 0
        for src_index, dst_index, blocks, src_lba, dst_lba in segments:
            if src_index >= len(targets) or dst_index >= len(targets):
                return copy_aborted(UNREACHABLE_COPY_TARGET)
            source, dest = targets[src_index], targets[dst_index]
            if source is None or dest is None:
                return copy_aborted(UNREACHABLE_COPY_TARGET)
            bs = source.block_size
            if (dest.block_size != bs or src_lba + blocks > source.nblocks or dst_lba + blocks > dest.nblocks
                    or blocks * bs > MAX_SEGMENT_BYTES):
                return copy_aborted()
            if dest.mode.swp:
                return check(Sense(SenseKey.DATA_PROTECT, *S.SOFTWARE_WRITE_PROTECTED))
            if blocks:
                os.pwrite(dest.fd, os.pread(source.fd, blocks * bs, src_lba * bs), dst_lba * bs)
            done += 1
            copied += blocks * bs
        if (flags >> 3) & 0x03 in (0, 1):  # LIST ID USAGE 00b/01b: the status is held for RECEIVE COPY RESULTS
            self.statuses[(nexus, list_id)] = (done, copied)
            while len(self.statuses) > HELD_STATUSES:
                self.statuses.popitem(last=False)
        return GOOD

    def _target(self, descriptor: bytes) -> DiskLun | None:
        """The LU whose designator the identification descriptor names (LU ID TYPE is ignored, as
        SPC-4 says), if it is a block device of the right block size here."""
        peripheral_type = descriptor[1] & 0x1F
        length = descriptor[7]
        designator = descriptor[8 : 8 + length]
        block_size = int.from_bytes(descriptor[29:32], "big")
        if peripheral_type != 0:
            return None
        for lun in self.luns():
            if lun.identity.naa == designator and lun.block_size == block_size:
                return lun
        return None

    def receive_copy_results(self, nexus: Nexus, cdb: bytes) -> ScsiResult:
        sa = cdb[1] & 0x1F
        alloc = struct.unpack_from(">I", cdb, 10)[0]
        if sa == SA_OPERATING_PARAMETERS:
            codes = bytes((BLOCK_TO_BLOCK[0], TARGET_DESCRIPTOR[0]))
            body = struct.pack(">BxxxHHIIIIIxxHBBBBxxxB", 0, MAX_TARGET_DESCRIPTORS, MAX_SEGMENT_DESCRIPTORS,
                               MAX_DESCRIPTOR_LIST_LENGTH, MAX_SEGMENT_BYTES, 0, 0, 0, 1, 1, 0, 0, 0, len(codes)) + codes
            data = struct.pack(">I", len(body)) + body
        elif sa == SA_COPY_STATUS:
            status = self.statuses.get((nexus, cdb[2]))
            if status is None:
                return illegal(S.INVALID_FIELD_IN_CDB, field_pointer=2)  # no such copy held
            segments, nbytes = status
            # COPY MANAGER STATUS 0: completed; TRANSFER COUNT in bytes (units 00h)
            data = struct.pack(">IBHBI", 8, 0, segments, 0, nbytes)
        else:
            return illegal(S.INVALID_FIELD_IN_CDB, field_pointer=1)
        return ScsiResult(data=data[:alloc])
