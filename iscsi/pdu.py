"""iSCSI PDUs (RFC 7143 §11): the 48-byte Basic Header Segment, AHS, padding and digests.

The one place that knows the wire layout of a PDU: `frame()` writes one (BHS, header digest, padded
data segment, data digest), `pdu_length()` says how long one is from its first 48 bytes, and
`PduReader` cuts a byte stream into `Pdu`s. Initiator and target both frame through here, and the
serial number arithmetic of CmdSN/StatSN/DataSN (RFC 1982) lives here too.

Sans-IO: bytes in, bytes out. Field offsets are the RFC's; accessors read the BHS in place so the
hot path never copies a header.
"""

from __future__ import annotations

import enum
import struct

from .digest import DIGEST_LEN, digest

BHS_LEN = 48
RESERVED_TAG = 0xFFFFFFFF  # ITT/TTT "no tag"
MAX_AHS_LEN = 255 * 4  # TotalAHSLength is one byte of 4-byte words
SN_MASK = 0xFFFFFFFF  # CmdSN, StatSN, DataSN, R2TSN are 32-bit serial numbers

# Every BHS whose bytes 20..47 are eight 32-bit words (all but the SCSI Command): opcode, flags,
# bytes 2 and 3, TotalAHSLength<<24 | DataSegmentLength, LUN (or ISID/TSIH), ITT, then the words at
# 20, 24, ..., 44 (TTT, StatSN/CmdSN, ExpCmdSN/ExpStatSN, MaxCmdSN, DataSN/R2TSN, offset, residual).
BHS = struct.Struct(">BBBBI8sIIIIIIII")
# The SCSI Command: ..., ITT, Expected Data Transfer Length, CmdSN, ExpStatSN, CDB.
SCSI_CMD_BHS = struct.Struct(">BBBBI8sIIII16s")

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")


def op_name(opcode: int) -> str:
    """An opcode's RFC 7143 name (NOP_OUT, SCSI_CMD, ...), or its number."""
    try:
        return Op(opcode & 0x3F).name
    except ValueError:
        return f"opcode 0x{opcode & 0x3F:02x}"


def sn_lt(a: int, b: int) -> bool:
    """RFC 1982 serial number arithmetic for 32-bit sequence numbers: a < b."""
    return a != b and ((b - a) & SN_MASK) < 0x80000000


def sn_gt(a: int, b: int) -> bool:
    """RFC 1982: a > b."""
    return a != b and ((a - b) & SN_MASK) < 0x80000000


def pdu_length(bhs: bytes | bytearray | memoryview, *, header_digest: bool, data_digest: bool) -> int:
    """Total on-wire length of the PDU whose first 48 bytes are `bhs`: BHS, AHS, header digest,
    data segment padded to 4 bytes, data digest (none for an empty segment)."""
    if len(bhs) < BHS_LEN:
        raise ValueError(f"a BHS is {BHS_LEN} bytes, got {len(bhs)}")
    dlen = (bhs[5] << 16) | (bhs[6] << 8) | bhs[7]
    n = BHS_LEN + bhs[4] * 4 + dlen + ((-dlen) & 3)
    if header_digest:
        n += DIGEST_LEN
    if data_digest and dlen:
        n += DIGEST_LEN
    return n


def bhs_itt(bhs: bytes | bytearray | memoryview) -> int:
    """The Initiator Task Tag (bytes 16-19) of a BHS."""
    itt: int = _U32.unpack_from(bhs, 16)[0]
    return itt


def frame(out: list[bytes], bhs: bytes, data: bytes | bytearray | memoryview = b"", *, header_digest: bool = False,
          data_digest: bool = False) -> None:
    """Append one PDU to `out` as the pieces that go on the wire (joined by the caller's single
    write): the header (BHS plus any AHS, DataSegmentLength already set), its digest, the data
    segment padded to 4 bytes, its digest."""
    out.append(bhs)
    if header_digest:
        out.append(digest(bhs))
    if data:
        pad = _PAD[len(data) & 3]
        if pad:
            data = bytes(data) + pad
        out.append(data)  # type: ignore[arg-type]
        if data_digest:
            out.append(digest(data))


class Op(enum.IntEnum):
    # initiator -> target
    NOP_OUT = 0x00
    SCSI_CMD = 0x01
    TASK_MGMT_REQ = 0x02
    LOGIN_REQ = 0x03
    TEXT_REQ = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQ = 0x06
    SNACK = 0x10
    # target -> initiator
    NOP_IN = 0x20
    SCSI_RSP = 0x21
    TASK_MGMT_RSP = 0x22
    LOGIN_RSP = 0x23
    TEXT_RSP = 0x24
    DATA_IN = 0x25
    LOGOUT_RSP = 0x26
    R2T = 0x31
    ASYNC_MSG = 0x32
    REJECT = 0x3F


INITIATOR_OPS = frozenset({0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x10})
TARGET_OPS = frozenset({0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x31, 0x32, 0x3F})

# byte 1 flag bits
F_FINAL = 0x80
F_READ = 0x40  # SCSI Command R; Data-In A (acknowledge); Text/Login C is 0x40 too
F_CONTINUE = 0x40
F_WRITE = 0x20
F_TRANSIT = 0x80  # Login T
# SCSI Response / Data-In residual flags
F_BIDI_OVERFLOW = 0x10
F_BIDI_UNDERFLOW = 0x08
F_OVERFLOW = 0x04
F_UNDERFLOW = 0x02
F_STATUS = 0x01  # Data-In S


class TmfFunction(enum.IntEnum):
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(enum.IntEnum):
    FUNCTION_COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    REJECTED = 255


class RejectReason(enum.IntEnum):
    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OP_REJECT = 0x0A
    WAITING_FOR_LOGOUT = 0x0C


class PduError(Exception):
    """The byte stream cannot be parsed further (bad header digest, oversized segment)."""

    def __init__(self, message: str, bhs: bytes = b"", reason: RejectReason = RejectReason.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.bhs = bhs
        self.reason = reason


class DataDigestError(Exception):
    """A PDU whose data digest is wrong: the header is sound, so the stream is still in sync."""

    def __init__(self, pdu: "Pdu") -> None:
        super().__init__(f"data digest error in {pdu.describe()}")
        self.pdu = pdu


class Pdu:
    """One PDU: a mutable BHS plus AHS and data segment (unpadded)."""

    __slots__ = ("bhs", "ahs", "data")

    def __init__(self, bhs: bytes | bytearray | None = None, data: bytes | bytearray | memoryview = b"", ahs: bytes = b"") -> None:
        self.bhs = bytearray(bhs) if bhs is not None else bytearray(BHS_LEN)
        self.ahs = ahs
        self.data = data

    @classmethod
    def new(cls, op: int, flags: int = 0, *, immediate: bool = False, itt: int = RESERVED_TAG, data: bytes | bytearray | memoryview = b"") -> Pdu:
        p = cls(None, data)
        p.bhs[0] = op | (0x40 if immediate else 0)
        p.bhs[1] = flags
        _U32.pack_into(p.bhs, 16, itt)
        return p

    # --- common fields -------------------------------------------------------------------------
    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F

    @property
    def immediate(self) -> bool:
        return bool(self.bhs[0] & 0x40)

    @property
    def flags(self) -> int:
        return self.bhs[1]

    @property
    def final(self) -> bool:
        return bool(self.bhs[1] & F_FINAL)

    @property
    def itt(self) -> int:
        return bhs_itt(self.bhs)

    @property
    def lun_field(self) -> bytes:
        return bytes(self.bhs[8:16])

    def u8(self, off: int) -> int:
        return self.bhs[off]

    def u16(self, off: int) -> int:
        value: int = _U16.unpack_from(self.bhs, off)[0]
        return value

    def u32(self, off: int) -> int:
        value: int = _U32.unpack_from(self.bhs, off)[0]
        return value

    def u64(self, off: int) -> int:
        value: int = _U64.unpack_from(self.bhs, off)[0]
        return value

    def set_u8(self, off: int, v: int) -> Pdu:
        self.bhs[off] = v
        return self

    def set_u16(self, off: int, v: int) -> Pdu:
        _U16.pack_into(self.bhs, off, v)
        return self

    def set_u32(self, off: int, v: int) -> Pdu:
        _U32.pack_into(self.bhs, off, v & 0xFFFFFFFF)
        return self

    def set_u64(self, off: int, v: int) -> Pdu:
        _U64.pack_into(self.bhs, off, v)
        return self

    def set_lun(self, lun: int) -> Pdu:
        self.bhs[8:16] = encode_lun(lun)
        return self

    def describe(self) -> str:
        return f"{op_name(self.opcode)} itt=0x{self.itt:08x} len={len(self.data)}"

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        """BHS (+AHS) (+header digest) + data + padding (+data digest)."""
        n = len(self.data)
        bhs = self.bhs
        bhs[4] = len(self.ahs) // 4
        bhs[5] = (n >> 16) & 0xFF
        bhs[6] = (n >> 8) & 0xFF
        bhs[7] = n & 0xFF
        head = bytes(bhs) + self.ahs if self.ahs else bytes(bhs)
        parts: list[bytes] = []
        frame(parts, head, self.data, header_digest=header_digest, data_digest=data_digest)
        return b"".join(parts)


def encode_lun(lun: int) -> bytes:
    """SAM single-level LUN: peripheral addressing below 256, flat space addressing above."""
    if lun < 256:
        return bytes((0, lun, 0, 0, 0, 0, 0, 0))
    if lun < 0x4000:
        return bytes((0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0, 0, 0))
    raise ValueError(f"LUN {lun} is out of range for single-level addressing")


def decode_lun(field: bytes | bytearray | memoryview) -> int:
    method = field[0] >> 6
    if any(field[2:8]):
        return -1  # a second level: not served
    if method == 1:
        return ((field[0] & 0x3F) << 8) | field[1]
    if method == 0 and not field[0] & 0x3F:
        return field[1]
    return -1  # bus identifiers, logical unit or extended addressing: not served


class PduReader:
    """Sans-IO PDU framer: `feed(bytes)`, then `next()` until it returns None.

    Buffers at most one PDU plus whatever one `feed` brought: a segment longer than `max_data`
    raises PduError instead of being buffered.
    """

    def __init__(self, *, max_data: int = 1 << 24, header_digest: bool = False, data_digest: bool = False) -> None:
        self.buf = bytearray()
        self.pos = 0
        self.max_data = max_data
        self.header_digest = header_digest
        self.data_digest = data_digest

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data

    @property
    def buffered(self) -> int:
        return len(self.buf) - self.pos

    def next(self) -> Pdu | None:
        buf = self.buf
        pos = self.pos
        avail = len(buf) - pos
        if avail < BHS_LEN:
            return None
        bhs = buf[pos : pos + BHS_LEN]
        dlen = (bhs[5] << 16) | (bhs[6] << 8) | bhs[7]
        if dlen > self.max_data:
            raise PduError(f"data segment of {dlen} bytes exceeds MaxRecvDataSegmentLength {self.max_data}", bytes(bhs))
        total = pdu_length(bhs, header_digest=self.header_digest, data_digest=self.data_digest)
        if avail < total:
            return None
        hend = pos + BHS_LEN + bhs[4] * 4
        dstart = hend
        if self.header_digest:
            if digest(memoryview(buf)[pos:hend]) != buf[hend : hend + DIGEST_LEN]:
                raise PduError("header digest error", bytes(bhs))
            dstart += DIGEST_LEN
        pdu = Pdu.__new__(Pdu)
        pdu.bhs = bhs
        pdu.ahs = bytes(buf[pos + BHS_LEN : hend]) if hend > pos + BHS_LEN else b""
        pdu.data = bytes(buf[dstart : dstart + dlen]) if dlen else b""
        self.pos = pos + total
        if self.data_digest and dlen:
            dend = dstart + dlen + ((-dlen) & 3)
            if digest(memoryview(buf)[dstart:dend]) != buf[dend : dend + DIGEST_LEN]:
                raise DataDigestError(pdu)
        return pdu


# --- text segments (RFC 7143 §6): key=value pairs, each NUL-terminated -------------------------------


def parse_text(data: bytes | bytearray | memoryview, *, strict: bool = False) -> list[tuple[str, str]]:
    """Split key=value text; `strict` refuses bytes that are not UTF-8 (RFC 7143 §6.1) with a
    ValueError instead of replacing them, as a target must for names it will match and log."""
    errors = "strict" if strict else "replace"
    pairs: list[tuple[str, str]] = []
    for item in bytes(data).split(b"\0"):
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        if not sep:
            raise ValueError(f"text item without '=': {item[:64]!r}")
        pairs.append((key.decode("utf-8", errors), value.decode("utf-8", errors)))
    return pairs


def encode_text(pairs: list[tuple[str, str]] | dict[str, str]) -> bytes:
    items = pairs.items() if isinstance(pairs, dict) else pairs
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in items)
