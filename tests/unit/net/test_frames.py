"""Frame arithmetic: MTU fragments for UDP, MSS segments for TCP."""

from __future__ import annotations

import functools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emu.mm.page_alloc import Zone
from emu.mm.slab import Slabs
from emu.net.rx import IP_HDR, MSS_DEFAULT, MTU_DEFAULT, TCP_HDR, UDP_HDR, ip_fragments, udp_frames
from emu.net.stack import NetStack


@given(st.integers(min_value=0, max_value=65507))
def test_udp_fragment_count_matches_the_formula(L: int) -> None:
    n = udp_frames(L)
    if L + 28 <= 1500:
        assert n == 1
    else:
        assert n == math.ceil((L + 8) / (1500 - 20))


@given(st.integers(min_value=0, max_value=65507), st.integers(min_value=68, max_value=9000))
def test_fragments_tile_the_payload(L: int, mtu: int) -> None:
    frags = ip_fragments(L + 8, mtu)
    off = 0
    for i, (o, n, more) in enumerate(frags):
        assert o == off
        assert n + 20 <= mtu  # every fragment is a frame that fits the MTU
        assert more == (i < len(frags) - 1)
        if more:
            assert n % 8 == 0  # offsets are in 8-byte units
        off += n
    assert off == L + 8


def test_fragment_examples() -> None:
    assert ip_fragments(1480) == ((0, 1480, False),)
    assert ip_fragments(1481) == ((0, 1480, True), (1480, 1, False))
    assert len(ip_fragments(65515)) == 45


def test_header_sizes_and_mss() -> None:
    assert (IP_HDR, UDP_HDR, TCP_HDR, MTU_DEFAULT) == (20, 8, 32, 1500)
    assert MSS_DEFAULT == 1448 == MTU_DEFAULT - IP_HDR - TCP_HDR


@functools.cache
def _stack() -> NetStack:
    zone = Zone(4 << 20)
    return NetStack(zone, Slabs(zone))


@given(st.integers(min_value=1, max_value=300_000))
def test_tcp_sends_are_cut_into_mss_segments(n: int) -> None:
    sizes = _stack().tx_frame_sizes("tcp", n)
    assert len(sizes) == -(-n // MSS_DEFAULT)  # what tcp_chunks(n) was
    assert all(s == MSS_DEFAULT + IP_HDR + TCP_HDR for s in sizes[:-1])  # full segments, then the rest
    assert 0 < sizes[-1] - IP_HDR - TCP_HDR <= MSS_DEFAULT
    assert sum(sizes) == n + len(sizes) * (IP_HDR + TCP_HDR)


def test_tcp_segment_examples() -> None:
    assert len(_stack().tx_frame_sizes("tcp", 1448)) == 1
    assert _stack().tx_frame_sizes("tcp", 1449) == [1500, 1 + 52]


@given(st.integers(min_value=0, max_value=65507))
def test_udp_sends_are_the_ip_fragments(L: int) -> None:
    sizes = _stack().tx_frame_sizes("udp", L)
    assert len(sizes) == udp_frames(L)
    assert sum(sizes) == L + UDP_HDR + len(sizes) * IP_HDR
    assert all(s <= MTU_DEFAULT for s in sizes)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        ip_fragments(-1)
    with pytest.raises(ValueError):
        ip_fragments(100, mtu=24)
