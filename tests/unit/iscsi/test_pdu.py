"""PDU framing, digests, LUN addressing and text segments."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iscsi.digest import crc32c, digest
from iscsi.pdu import (
    BHS_LEN,
    DataDigestError,
    Op,
    Pdu,
    PduError,
    PduReader,
    decode_lun,
    encode_lun,
    encode_text,
    parse_text,
)


def test_crc32c_vectors_and_wire_order() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    # Least significant byte first on the wire (libiscsi and Wireshark agree).
    assert digest(b"123456789") == bytes((0x83, 0x92, 0x06, 0xE3))


def _sample(data: bytes = b"", ahs: bytes = b"") -> Pdu:
    p = Pdu.new(Op.SCSI_CMD, 0x80, itt=0x1234, data=data)
    p.ahs = ahs
    p.set_lun(5).set_u32(20, 4096).set_u32(24, 7)
    return p


@pytest.mark.parametrize("hd,dd", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dlen", [0, 1, 3, 4, 4097])
def test_roundtrip_padding_and_digests(hd: bool, dd: bool, dlen: int) -> None:
    data = os.urandom(dlen)
    wire = _sample(data, ahs=b"\x01\x02\x03\x04").encode(hd, dd)
    expect = BHS_LEN + 4 + (4 if hd else 0) + dlen + (-dlen % 4) + (4 if dd and dlen else 0)
    assert len(wire) == expect
    r = PduReader(header_digest=hd, data_digest=dd)
    r.feed(wire)
    p = r.next()
    assert p is not None and r.next() is None
    assert p.opcode == Op.SCSI_CMD and p.final and p.itt == 0x1234
    assert decode_lun(p.bhs[8:16]) == 5 and p.u32(20) == 4096
    assert p.ahs == b"\x01\x02\x03\x04"
    assert p.data == data
    assert wire[5:8] == dlen.to_bytes(3, "big")  # DataSegmentLength excludes padding


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=6), st.integers(1, 97))
def test_reader_reassembles_any_split(payloads: list[bytes], chunk: int) -> None:
    wire = b"".join(_sample(d).encode(True, True) for d in payloads)
    r = PduReader(header_digest=True, data_digest=True)
    got = []
    for i in range(0, len(wire), chunk):
        r.feed(wire[i : i + chunk])
        while (p := r.next()) is not None:
            got.append(p.data)
    assert got == payloads
    assert r.buffered == 0


def test_oversized_segment_is_refused_before_buffering() -> None:
    r = PduReader(max_data=8192)
    wire = _sample(bytes(8193)).encode()
    r.feed(wire[:BHS_LEN])  # the header alone is enough to refuse it
    with pytest.raises(PduError, match="exceeds"):
        r.next()


def test_header_digest_error_is_fatal_data_digest_error_is_not() -> None:
    good = _sample(b"abcd").encode(True, True)
    bad_hd = bytearray(good)
    bad_hd[BHS_LEN] ^= 0xFF
    r = PduReader(header_digest=True, data_digest=True)
    r.feed(bytes(bad_hd))
    with pytest.raises(PduError, match="header digest"):
        r.next()
    bad_dd = bytearray(good)
    bad_dd[-1] ^= 0xFF
    r = PduReader(header_digest=True, data_digest=True)
    r.feed(bytes(bad_dd) + good)
    with pytest.raises(DataDigestError):
        r.next()
    p = r.next()  # the stream is still in step: the next PDU parses
    assert p is not None and p.data == b"abcd"


def test_lun_addressing() -> None:
    assert encode_lun(0) == bytes(8)
    assert encode_lun(1)[:2] == b"\x00\x01"
    assert encode_lun(300)[:2] == bytes((0x41, 0x2C))  # flat space addressing
    for n in (0, 1, 255, 256, 300, 0x3FFF):
        assert decode_lun(encode_lun(n)) == n
    assert decode_lun(bytes((0, 1, 0, 1, 0, 0, 0, 0))) == -1  # second level: not served


def test_text_segments() -> None:
    data = encode_text([("TargetName", "iqn.x:y"), ("MaxBurstLength", "262144")])
    assert data == b"TargetName=iqn.x:y\0MaxBurstLength=262144\0"
    assert parse_text(data) == [("TargetName", "iqn.x:y"), ("MaxBurstLength", "262144")]
    with pytest.raises(ValueError):
        parse_text(b"novalue\0")
