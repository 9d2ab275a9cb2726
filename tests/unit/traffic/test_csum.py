from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP

from emu.traffic.csum import csum_replace, udp_csum_replace
from emu.traffic.profiles import _patch, _template
from emu.traffic.target import Target

loopback = st.integers(0x7F000000, 0x7FFFFFFF).map(lambda n: socket.inet_ntoa(n.to_bytes(4, "big")))


@settings(max_examples=60, deadline=None)
@given(src=loopback, dst=loopback, port=st.integers(1, 65535), size=st.integers(0, 300))
def test_patched_source_matches_a_fresh_scapy_build(src: str, dst: str, port: int, size: int) -> None:
    template = _template("127.0.0.1", Target(dst, port), size, 1)
    patched = _patch(template, socket.inet_aton(src), None, udp=True)
    fresh = _template(src, Target(dst, port), size, 1)
    assert patched[12:16] == socket.inet_aton(src)
    # Everything equal but the IP header checksum, which the kernel fills in (we zero it).
    assert patched[:10] + patched[12:] == fresh[:10] + fresh[12:]
    assert IP(fresh)[UDP].chksum == int.from_bytes(patched[26:28], "big")


def test_zero_udp_checksum_means_none_and_a_zero_result_is_sent_as_ffff() -> None:
    assert udp_csum_replace(0, b"\x7f\x00\x00\x01", b"\x7f\x40\x00\x01") == 0
    # Choose new bytes so the updated sum is 0: one's complement keeps it as 0xFFFF on the wire.
    assert csum_replace(0x1234, b"\x00\x00", b"\x12\x34") in (0, 0xFFFF)
    assert udp_csum_replace(0x1234, b"\x00\x00", b"\x12\x34") != 0
