"""Rate, duration and count bounds. Lower bounds on time follow from pacing arithmetic (exact);
upper bounds are generous: this machine is shared."""

from __future__ import annotations

import time

from emu.traffic import TrafficSpec, run


def test_rate_holds_the_sender_back(udp_receiver) -> None:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    stats = run(TrafficSpec(ports=(udp_receiver.port,), rate=1000, count=300, spoof=None))
    wall = time.monotonic() - t0
    assert stats.sent == 300 and stats.stopped == "count"
    assert stats.elapsed >= 0.299  # message n is not due before (n-1)/rate
    assert wall < 3.0
    assert stats.rate <= 1000 * 300 / 299 + 1
    assert udp_receiver.settle() == 300


def test_duration_stops_it_and_rate_caps_the_count(udp_receiver) -> None:  # type: ignore[no-untyped-def]
    stats = run(TrafficSpec(ports=(udp_receiver.port,), rate=2000, duration=0.4, spoof=None))
    assert stats.stopped == "duration"
    assert 0.4 <= stats.elapsed < 1.5
    assert 100 <= stats.sent <= 2000 * 0.4 + 1  # never ahead of the rate; not stalled either
    assert udp_receiver.settle() == stats.sent


def test_unpaced_run_still_stops_at_the_duration(udp_receiver) -> None:  # type: ignore[no-untyped-def]
    stats = run(TrafficSpec(ports=(udp_receiver.port,), rate=None, duration=0.2, spoof=None, size=16))
    assert stats.stopped == "duration" and 0.2 <= stats.elapsed < 1.2
    assert stats.sent > 1000  # unpaced really is fast, even on a busy machine


def test_tcp_stream_stops_on_time_when_the_receiver_never_reads() -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        stats = run(TrafficSpec(profile="tcp-stream", ports=(listener.getsockname()[1],), rate=None, duration=0.5, connections=2, spoof=None))
    finally:
        listener.close()
    assert stats.connections == 2 and stats.stopped == "duration"
    assert 0.5 <= stats.elapsed < 2.0  # full send buffers did not hold it past the duration
    assert stats.bytes > 0
