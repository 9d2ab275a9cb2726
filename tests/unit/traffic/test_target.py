from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emu.traffic.target import Target, TargetError, check_loopback, parse_spoof, parse_targets, spread_sources


def test_parse_targets_ports_share_the_host() -> None:
    assert parse_targets("127.0.0.1:9000,9001, 9002") == (Target("127.0.0.1", 9000), Target("127.0.0.1", 9001), Target("127.0.0.1", 9002))
    assert parse_targets("localhost:7,127.3.2.1:8,9") == (Target("127.0.0.1", 7), Target("127.3.2.1", 8), Target("127.3.2.1", 9))
    assert parse_targets("127.0.0.1:5,5") == (Target("127.0.0.1", 5),)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("10.0.0.1:9000", "only loopback"),
        ("127.0.0.1:9000,8.8.8.8:53", "only loopback"),
        ("0.0.0.0:9000", "only loopback"),
        ("255.255.255.255:9", "only loopback"),
        ("[::1]:9000", "not an IPv4"),
        ("example.com:80", "not an IPv4"),
        ("127.0.0.1:0", "outside 1..65535"),
        ("127.0.0.1:70000", "outside 1..65535"),
        ("9000", "has no host"),
        ("127.0.0.1", "'127.0.0.1' has no port"),
        ("localhost", "'localhost' has no port"),
        ("127.0.0.1:9000,127.0.0.2", "'127.0.0.2' has no port"),
        ("127.0.0.1:x", "not a number"),
        ("127.0.0.1:9000,", "empty entry"),
    ],
)
def test_bad_targets_are_refused_with_a_reason(text: str, fragment: str) -> None:
    with pytest.raises(TargetError, match=fragment) as info:
        parse_targets(text)
    assert info.value.param == "to"


@given(st.integers(0, 2**32 - 1))
def test_only_127_slash_8_passes(n: int) -> None:
    addr = str(ipaddress.IPv4Address(n))
    if addr.startswith("127."):
        assert check_loopback(addr) == addr
    else:
        with pytest.raises(TargetError):
            check_loopback(addr)


def test_spoof_range_must_lie_inside_loopback() -> None:
    assert str(parse_spoof("127.64.0.0/10")) == "127.64.0.0/10"
    for bad in ("0.0.0.0/0", "126.0.0.0/7", "10.0.0.0/8", "::1/128", "banana"):
        with pytest.raises(TargetError) as info:
            parse_spoof(bad)
        assert info.value.param == "spoof"


@pytest.mark.parametrize("cidr, n, expect", [("127.64.0.0/10", 1024, 1024), ("127.9.9.0/30", 100, 2), ("127.5.5.5/32", 10, 1), ("127.0.0.0/24", 254, 254)])
def test_spread_sources_are_distinct_and_inside(cidr: str, n: int, expect: int) -> None:
    net = ipaddress.ip_network(cidr)
    srcs = spread_sources(net, n)  # type: ignore[arg-type]
    assert len(srcs) == len(set(srcs)) == expect
    assert all(ipaddress.ip_address(s) in net for s in srcs)
    if net.num_addresses > 2:
        assert str(net.network_address) not in srcs and str(net.broadcast_address) not in srcs


def test_spread_sources_spread_over_the_range() -> None:
    srcs = spread_sources(ipaddress.IPv4Network("127.64.0.0/10"), 64)
    second_octets = {int(s.split(".")[1]) for s in srcs}
    assert len(second_octets) >= 32  # not 64 neighbours in one /24
