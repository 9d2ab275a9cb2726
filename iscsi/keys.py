"""Login/Text keys (RFC 7143 §13): the negotiated operational parameters and how each is decided.

Every key the initiator offers gets an explicit answer (libiscsi applies no defaults for keys left
unanswered: an unanswered HeaderDigest means CRC32C to it).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# key -> (kind, RFC default). kinds: "list" (first acceptable of the offer), "min", "max", "and",
# "or", "decl" (declarative).
KEY_RULES: dict[str, tuple[str, str]] = {
    "HeaderDigest": ("list", "None"),
    "DataDigest": ("list", "None"),
    "MaxConnections": ("min", "1"),
    "InitialR2T": ("or", "Yes"),
    "ImmediateData": ("and", "Yes"),
    "MaxRecvDataSegmentLength": ("decl", "8192"),
    "MaxBurstLength": ("min", "262144"),
    "FirstBurstLength": ("min", "65536"),
    "DefaultTime2Wait": ("max", "2"),
    "DefaultTime2Retain": ("min", "20"),
    "MaxOutstandingR2T": ("min", "1"),
    "DataPDUInOrder": ("or", "Yes"),
    "DataSequenceInOrder": ("or", "Yes"),
    "ErrorRecoveryLevel": ("min", "0"),
    "IFMarker": ("and", "No"),
    "OFMarker": ("and", "No"),
}
NUMERIC_RANGES: dict[str, tuple[int, int]] = {
    "MaxConnections": (1, 65535),
    "MaxRecvDataSegmentLength": (512, (1 << 24) - 1),
    "MaxBurstLength": (512, (1 << 24) - 1),
    "FirstBurstLength": (512, (1 << 24) - 1),
    "DefaultTime2Wait": (0, 3600),
    "DefaultTime2Retain": (0, 3600),
    "MaxOutstandingR2T": (1, 65535),
    "ErrorRecoveryLevel": (0, 2),
}
# Keys an initiator declares; the target takes note and does not answer.
INITIATOR_DECLARATIVE = {"InitiatorName", "InitiatorAlias", "SessionType", "TargetName"}
# Keys from RFC 3720 / iSER that are known but irrelevant here.
IRRELEVANT = {"IFMarkInt", "OFMarkInt", "RDMAExtensions", "InitiatorRecvDataSegmentLength", "TargetRecvDataSegmentLength", "TaskReporting", "iSCSIProtocolLevel"}
# Login keys that may NOT be renegotiated in the full feature phase (RFC 7143 §13: "IO", "LO", or
# sent by the target only); a Text Request offering one is answered Irrelevant. Of the "ALL" keys,
# MaxRecvDataSegmentLength is re-declared there and InitiatorAlias noted without an answer.
LOGIN_ONLY = (set(KEY_RULES) - {"MaxRecvDataSegmentLength"}) | IRRELEVANT | {
    "InitiatorName", "TargetName", "SessionType", "AuthMethod", "TargetAlias", "TargetAddress", "TargetPortalGroupTag",
}


def yes_no(value: bool) -> str:
    """A boolean key's value as the text says it."""
    return "Yes" if value else "No"


def digest_name(crc32c: bool) -> str:
    """A HeaderDigest/DataDigest value."""
    return "CRC32C" if crc32c else "None"


class NegotiationError(ValueError):
    """A key value that cannot be negotiated (the login fails with an initiator error)."""


@dataclass
class SessionParams:
    """Negotiated operational parameters of one session (RFC defaults until negotiated).

    `max_recv_data_segment_length` is OUR receive limit; `peer_max_recv_data_segment_length` the
    peer's (the largest data segment we may send).
    """

    header_digest: bool = False
    data_digest: bool = False
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    max_recv_data_segment_length: int = 8192
    peer_max_recv_data_segment_length: int = 8192
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def describe(self) -> str:
        """The negotiated keys in RFC 7143's words, one line (for the target's login log)."""
        return (f"HeaderDigest={digest_name(self.header_digest)} DataDigest={digest_name(self.data_digest)} "
                f"MaxRecvDataSegmentLength={self.max_recv_data_segment_length}/{self.peer_max_recv_data_segment_length} "
                f"MaxBurstLength={self.max_burst_length} FirstBurstLength={self.first_burst_length} "
                f"ImmediateData={yes_no(self.immediate_data)} InitialR2T={yes_no(self.initial_r2t)} "
                f"MaxOutstandingR2T={self.max_outstanding_r2t} ErrorRecoveryLevel={self.error_recovery_level} "
                f"DefaultTime2Wait={self.default_time2wait} DefaultTime2Retain={self.default_time2retain}")


_ATTR = {
    "HeaderDigest": "header_digest",
    "DataDigest": "data_digest",
    "MaxConnections": "max_connections",
    "InitialR2T": "initial_r2t",
    "ImmediateData": "immediate_data",
    "MaxBurstLength": "max_burst_length",
    "FirstBurstLength": "first_burst_length",
    "DefaultTime2Wait": "default_time2wait",
    "DefaultTime2Retain": "default_time2retain",
    "MaxOutstandingR2T": "max_outstanding_r2t",
    "DataPDUInOrder": "data_pdu_in_order",
    "DataSequenceInOrder": "data_sequence_in_order",
    "ErrorRecoveryLevel": "error_recovery_level",
}


def _bool(key: str, value: str) -> bool:
    if value == "Yes":
        return True
    if value == "No":
        return False
    raise NegotiationError(f"{key}={value}: expected Yes or No")


def number(key: str, value: str) -> int:
    """A numerical key's value, checked against the RFC's range for it."""
    try:
        n = int(value, 0)
    except ValueError:
        raise NegotiationError(f"{key}={value}: not a number") from None
    lo, hi = NUMERIC_RANGES.get(key, (0, 1 << 32))
    if not lo <= n <= hi:
        raise NegotiationError(f"{key}={value}: outside {lo}..{hi}")
    return n


def negotiate(key: str, offer: str, ours: str) -> str:
    """The answer to an offered `key=offer` when our own preference is `ours` (RFC 7143 §6.2)."""
    kind, _ = KEY_RULES[key]
    if kind == "list":
        offered = offer.split(",")
        acceptable = ours.split(",")
        for v in offered:
            if v in acceptable:
                return v
        return "Reject"
    if kind in ("and", "or"):
        x, y = _bool(key, offer), _bool(key, ours)
        return yes_no((x and y) if kind == "and" else (x or y))
    a, b = number(key, offer), number(key, ours)
    if kind == "min":
        return str(min(a, b))
    if kind == "max":
        return str(max(a, b))
    return ours


def apply(params: SessionParams, key: str, value: str) -> None:
    """Record a negotiated result in `params` (declarative MaxRecvDataSegmentLength excluded)."""
    attr = _ATTR.get(key)
    if attr is None:
        return
    kind, _ = KEY_RULES[key]
    if key in ("HeaderDigest", "DataDigest"):
        if value not in ("None", "CRC32C"):
            raise NegotiationError(f"{key}={value}")
        setattr(params, attr, value == "CRC32C")
    elif kind in ("and", "or"):
        setattr(params, attr, _bool(key, value))
    else:
        setattr(params, attr, number(key, value))


@dataclass
class TargetPrefs:
    """What the target offers/accepts; turned into negotiation answers."""

    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1 << 20
    first_burst_length: int = 262144
    digests: str = "None,CRC32C"
    immediate_data: bool = True
    initial_r2t: bool = False
    max_outstanding_r2t: int = 1
    default_time2wait: int = 2
    default_time2retain: int = 0

    def ours(self, key: str) -> str:
        return {
            "HeaderDigest": self.digests,
            "DataDigest": self.digests,
            "MaxConnections": "1",
            "InitialR2T": yes_no(self.initial_r2t),
            "ImmediateData": yes_no(self.immediate_data),
            "MaxRecvDataSegmentLength": str(self.max_recv_data_segment_length),
            "MaxBurstLength": str(self.max_burst_length),
            "FirstBurstLength": str(self.first_burst_length),
            "DefaultTime2Wait": str(self.default_time2wait),
            "DefaultTime2Retain": str(self.default_time2retain),
            "MaxOutstandingR2T": str(self.max_outstanding_r2t),
            "DataPDUInOrder": "Yes",
            "DataSequenceInOrder": "Yes",
            "ErrorRecoveryLevel": "0",
            "IFMarker": "No",
            "OFMarker": "No",
        }[key]
