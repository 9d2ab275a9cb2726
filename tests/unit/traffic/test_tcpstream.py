from __future__ import annotations

import ipaddress
import time

import pytest

from emu.traffic import TrafficSpec, run


def test_tcp_connections_stream_exact_byte_counts(tcp_sink) -> None:  # type: ignore[no-untyped-def]
    stats = run(TrafficSpec(profile="tcp-stream", ports=(tcp_sink.port,), rate=None, count=400, size=5000, connections=8, spoof=None))
    assert (stats.method, stats.connections, stats.sent, stats.bytes, stats.stopped) == ("socket", 8, 400, 2_000_000, "count")
    deadline = time.monotonic() + 5
    while tcp_sink.bytes < 2_000_000 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert tcp_sink.bytes == 2_000_000 and len(tcp_sink.peers) == 8


def test_tcp_sources_bind_inside_the_spoof_range_without_raw_sockets(tcp_sink) -> None:  # type: ignore[no-untyped-def]
    stats = run(TrafficSpec(profile="tcp-stream", ports=(tcp_sink.port,), rate=None, count=16, size=100, connections=4, spoof="127.99.0.0/16"))
    assert stats.connections == 4
    deadline = time.monotonic() + 5  # the sink's accept thread records the peers
    while len(set(tcp_sink.peers)) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(set(tcp_sink.peers)) == 4
    assert all(ipaddress.ip_address(p) in ipaddress.ip_network("127.99.0.0/16") for p in tcp_sink.peers)


def test_tcp_stream_without_a_listener_says_so() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ConnectionRefusedError, match="is something listening"):
        run(TrafficSpec(profile="tcp-stream", ports=(port,), count=1, connections=2, spoof=None))
