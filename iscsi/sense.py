"""SCSI status codes, fixed-format sense data (SPC-4 §4.5.3), and what a command ends with."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(enum.IntEnum):
    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class SenseKey(enum.IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    MISCOMPARE = 0xE


# (ASC, ASCQ) pairs used here, by their T10 names.
INVALID_COMMAND_OPERATION_CODE = (0x20, 0x00)
LBA_OUT_OF_RANGE = (0x21, 0x00)
INVALID_FIELD_IN_CDB = (0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED = (0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
INVALID_FIELD_IN_INFORMATION_UNIT = (0x0E, 0x03)
SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)
MISCOMPARE_DURING_VERIFY = (0x1D, 0x00)
NOT_READY_INIT_REQUIRED = (0x04, 0x02)
DATA_PHASE_ERROR = (0x4B, 0x00)
PROTOCOL_SERVICE_CRC_ERROR = (0x47, 0x05)  # a data digest error (RFC 7143 §11.17.1)
WRITE_ERROR = (0x0C, 0x00)
UNRECOVERED_READ_ERROR = (0x11, 0x00)
NO_ADDITIONAL_SENSE = (0x00, 0x00)
INVALID_RELEASE_OF_PERSISTENT_RESERVATION = (0x26, 0x04)
SOFTWARE_WRITE_PROTECTED = (0x27, 0x02)
# UNIT ATTENTION conditions (SPC-4 §5.14, SAM-5 table 39)
POWER_ON_RESET = (0x29, 0x00)
SCSI_BUS_RESET_OCCURRED = (0x29, 0x02)  # established by a TARGET WARM RESET
BUS_DEVICE_RESET_FUNCTION_OCCURRED = (0x29, 0x03)  # established by a LOGICAL UNIT RESET
MODE_PARAMETERS_CHANGED = (0x2A, 0x01)
RESERVATIONS_PREEMPTED = (0x2A, 0x03)
RESERVATIONS_RELEASED = (0x2A, 0x04)
REGISTRATIONS_PREEMPTED = (0x2A, 0x05)
# Their names for messages: `LOGICAL UNIT NOT SUPPORTED` says more than 0x25/0x00.
ASC_NAMES: dict[tuple[int, int], str] = {
    v: k.replace("_", " ") for k, v in dict(globals()).items()
    if k.isupper() and isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, int) for x in v)
}


@dataclass(frozen=True)
class Sense:
    key: int
    asc: int
    ascq: int
    information: int | None = None
    field_pointer: int | None = None  # sense-key specific: the offending CDB byte (SKSV, C/D=1)

    def fixed(self) -> bytes:
        """18-byte fixed-format sense data (response code 0x70, current error)."""
        b = bytearray(18)
        b[0] = 0x70
        b[2] = self.key & 0x0F
        if self.information is not None:
            b[0] |= 0x80  # VALID
            b[3:7] = (self.information & 0xFFFFFFFF).to_bytes(4, "big")
        b[7] = 10
        b[12] = self.asc
        b[13] = self.ascq
        if self.field_pointer is not None:
            b[15] = 0xC0  # SKSV, C/D: the error is in the CDB
            b[16:18] = self.field_pointer.to_bytes(2, "big")
        return bytes(b)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> Sense | None:
        """Fixed (0x70/0x71) or descriptor (0x72/0x73) format."""
        if len(data) < 3:
            return None
        code = data[0] & 0x7F
        if code in (0x70, 0x71) and len(data) >= 14:
            return cls(data[2] & 0x0F, data[12], data[13])
        if code in (0x72, 0x73) and len(data) >= 4:
            return cls(data[1] & 0x0F, data[2], data[3])
        return None

    def __str__(self) -> str:
        try:
            key = SenseKey(self.key).name
        except ValueError:
            key = f"0x{self.key:x}"
        name = ASC_NAMES.get((self.asc, self.ascq))
        return f"{key} ASC/ASCQ 0x{self.asc:02x}/0x{self.ascq:02x}" + (f" ({name})" if name else "")


def illegal_request(ascq_pair: tuple[int, int], field_pointer: int | None = None) -> Sense:
    return Sense(SenseKey.ILLEGAL_REQUEST, *ascq_pair, field_pointer=field_pointer)


@dataclass
class ScsiResult:
    """How a command ends: status, Data-In, sense; and whether its answer must wait for an fsync."""

    status: int = Status.GOOD
    data: bytes | bytearray | memoryview = b""
    sense: Sense | None = None
    sync: bool = False  # the response must wait until the backing file is fsync'ed


GOOD = ScsiResult()
RESERVATION_CONFLICT = ScsiResult(Status.RESERVATION_CONFLICT)


def check(s: Sense) -> ScsiResult:
    """CHECK CONDITION with this sense."""
    return ScsiResult(Status.CHECK_CONDITION, b"", s)


def illegal(asc_pair: tuple[int, int], field_pointer: int | None = None) -> ScsiResult:
    """CHECK CONDITION, ILLEGAL REQUEST with this ASC/ASCQ."""
    return check(illegal_request(asc_pair, field_pointer))
