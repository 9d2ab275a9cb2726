"""A CHECK CONDITION's sense reads with its T10 name, so a user sees what went wrong."""

from __future__ import annotations

from iscsi.initiator_task import ScsiError
from iscsi.sense import LOGICAL_UNIT_NOT_SUPPORTED, Sense, SenseKey, Status


def test_sense_names_its_additional_sense_code() -> None:
    s = Sense(SenseKey.ILLEGAL_REQUEST, *LOGICAL_UNIT_NOT_SUPPORTED)
    err = ScsiError(bytes([0x25]) + bytes(9), Status.CHECK_CONDITION, s)
    assert str(err) == ("SCSI opcode 0x25: CHECK_CONDITION, ILLEGAL_REQUEST ASC/ASCQ 0x25/0x00 "
                        "(LOGICAL UNIT NOT SUPPORTED)")
    assert str(Sense(SenseKey.ILLEGAL_REQUEST, 0x99, 0x01)) == "ILLEGAL_REQUEST ASC/ASCQ 0x99/0x01"  # unnamed
