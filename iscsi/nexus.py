"""The I_T nexus (SAM-5 §4.6): which initiator port talks to the target port.

For iSCSI the initiator port is the initiator name plus the ISID (RFC 7143 §4.4.1), and this
target has one target port (portal group 1). Reservations and unit attentions are per I_T nexus, so
they outlive any one session: a session reinstated with the same ISID is the same nexus.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PROTOCOL_ISCSI = 0x5
TRANSPORT_ID_WITH_ISID = 0x40  # FORMAT CODE 01b: iSCSI name, ",i,0x", ISID


@dataclass(frozen=True)
class Nexus:
    initiator_name: str
    isid: bytes

    def __str__(self) -> str:
        return f"{self.initiator_name},i,0x{self.isid.hex()}"

    def transport_id(self) -> bytes:
        """The initiator port's TransportID (SPC-4 §7.6.4.6), as READ FULL STATUS reports it."""
        name = str(self).encode() + b"\0"
        name += bytes(-len(name) % 4)
        return bytes((TRANSPORT_ID_WITH_ISID | PROTOCOL_ISCSI, 0)) + struct.pack(">H", len(name)) + name
