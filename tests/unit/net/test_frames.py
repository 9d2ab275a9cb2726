"""Frame arithmetic (DESIGN §6): MTU fragments for UDP, MSS chunks for TCP."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emu.net.wire import MSS_DEFAULT, ip_fragments, tcp_chunks, udp_frames


@given(st.integers(min_value=0, max_value=65507))
def test_udp_fragment_count_matches_design_formula(L: int) -> None:
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


def test_tcp_chunks() -> None:
    assert MSS_DEFAULT == 1448
    assert tcp_chunks(0) == 0
    assert tcp_chunks(1448) == 1
    assert tcp_chunks(1449) == 2


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        ip_fragments(-1)
    with pytest.raises(ValueError):
        ip_fragments(100, mtu=24)
