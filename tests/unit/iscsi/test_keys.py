"""Operational key negotiation rules (RFC 7143 §13)."""

from __future__ import annotations

import pytest

from iscsi.keys import NegotiationError, SessionParams, apply, negotiate


@pytest.mark.parametrize(
    "key,offer,ours,result",
    [
        ("HeaderDigest", "None,CRC32C", "None,CRC32C", "None"),  # the offer's order wins
        ("HeaderDigest", "CRC32C,None", "None,CRC32C", "CRC32C"),
        ("HeaderDigest", "CRC32C", "None", "Reject"),
        ("MaxBurstLength", "262144", "1048576", "262144"),  # min
        ("FirstBurstLength", "1048576", "262144", "262144"),
        ("DefaultTime2Wait", "0", "2", "2"),  # max
        ("InitialR2T", "No", "No", "No"),  # OR
        ("InitialR2T", "No", "Yes", "Yes"),
        ("ImmediateData", "Yes", "No", "No"),  # AND
        ("ErrorRecoveryLevel", "2", "0", "0"),
        ("IFMarker", "No", "No", "No"),
    ],
)
def test_negotiate(key: str, offer: str, ours: str, result: str) -> None:
    assert negotiate(key, offer, ours) == result


def test_bad_values_refused() -> None:
    with pytest.raises(NegotiationError):
        negotiate("MaxBurstLength", "12", "262144")  # below 512
    with pytest.raises(NegotiationError):
        negotiate("ImmediateData", "Maybe", "Yes")
    with pytest.raises(NegotiationError):
        negotiate("MaxBurstLength", "lots", "262144")


def test_apply() -> None:
    p = SessionParams()
    apply(p, "HeaderDigest", "CRC32C")
    apply(p, "InitialR2T", "No")
    apply(p, "MaxBurstLength", "65536")
    assert p.header_digest and not p.initial_r2t and p.max_burst_length == 65536


def test_number_checks_the_rfc_range() -> None:
    from iscsi.keys import number

    assert number("MaxRecvDataSegmentLength", "8192") == 8192
    assert number("ErrorRecoveryLevel", "0") == 0
    for bad in ("511", "16777216", "8k", ""):
        with pytest.raises(NegotiationError):
            number("MaxRecvDataSegmentLength", bad)
