"""What arrives at real receiving sockets on loopback.

Fragment queues outlive a run by ipfrag_time (30 s) and are shared by the whole host, so each frag
test spoofs from its own range, none inside the default 127.64.0.0/10 (which `netswap inject` and
other runs use): leftovers of an earlier test, or of an earlier run of the suite, cannot meet them.
"""

from __future__ import annotations

import ipaddress

from peers import require_root

from emu.traffic import TrafficSpec, run
from emu.traffic.profiles import payload


def test_udp_flood_spoofed_sources_are_seen_by_recvfrom(udp_receiver) -> None:  # type: ignore[no-untyped-def]
    require_root()
    stats = run(TrafficSpec(ports=(udp_receiver.port,), rate=None, count=3000, size=100, distinct=500, spoof="127.64.0.0/10"))
    assert (stats.method, stats.sent, stats.errors, stats.stopped) == ("raw", 3000, 0, "count")
    assert udp_receiver.settle() == 3000
    net = ipaddress.ip_network("127.64.0.0/10")
    assert len(udp_receiver.sources) == 500  # every distinct spoofed source, as recvfrom reports it
    assert all(ipaddress.ip_address(s) in net for s in udp_receiver.sources)
    assert max(udp_receiver.sources.values()) == 6  # the pool cycles evenly: 3000 / 500
    assert udp_receiver.sizes == {100: 3000} and udp_receiver.payloads == {payload(100)}  # checksums valid, bytes intact


def test_udp_flood_spreads_over_every_port(udp_receivers) -> None:  # type: ignore[no-untyped-def]
    require_root()
    ports = tuple(r.port for r in udp_receivers)
    stats = run(TrafficSpec(ports=ports, rate=None, count=900, spoof="127.200.0.0/16"))
    assert stats.sent == 900
    assert [r.settle() for r in udp_receivers] == [300, 300, 300]


def test_frag_datagrams_are_reassembled_by_the_kernel(udp_receiver) -> None:  # type: ignore[no-untyped-def]
    require_root()
    stats = run(TrafficSpec(profile="frag", ports=(udp_receiver.port,), rate=None, count=120, size=5000, fragsize=1480, distinct=40, spoof="127.20.0.0/16"))
    assert (stats.sent, stats.packets) == (120, 120 * 4)  # 5008 bytes of UDP in 1480-byte pieces: 4 fragments
    assert udp_receiver.settle() == 120
    assert udp_receiver.sizes == {5000: 120} and udp_receiver.payloads == {payload(5000)}
    assert len(udp_receiver.sources) == 40  # spoofed sources survive reassembly too


def test_incomplete_frag_datagrams_never_reach_the_socket(udp_receiver) -> None:  # type: ignore[no-untyped-def]
    require_root()
    # Kept small: incomplete queues hold ~5 KB each for 30 s, and ipfrag_high_thresh is 4 MB.
    stats = run(TrafficSpec(profile="frag", ports=(udp_receiver.port,), rate=None, count=100, size=4000, incomplete=True, spoof="127.21.0.0/16"))
    assert (stats.sent, stats.packets) == (100, 100 * 2)  # 3 fragments each, the last left out
    assert udp_receiver.settle(quiet=0.3) == 0  # held in the reassembly queue, never delivered
    # The same socket does get complete datagrams: the missing piece is what held them back.
    run(TrafficSpec(profile="frag", ports=(udp_receiver.port,), rate=None, count=10, size=4000, spoof="127.22.0.0/16"))
    assert udp_receiver.settle() == 10


def test_a_frag_run_is_not_joined_to_the_leftovers_of_an_incomplete_one(udp_receivers) -> None:  # type: ignore[no-untyped-def]
    """Two runs over the same sources, back to back (well within ipfrag_time): had the second reused
    the first's IP IDs, its fragments would land in the first's half-full queues, and complete
    them, so its datagrams would surface at the FIRST run's port, or be dropped as overlaps."""
    require_root()
    first, second, _ = udp_receivers
    spoof = "127.23.0.0/16"
    run(TrafficSpec(profile="frag", ports=(first.port,), rate=None, count=50, size=4000, incomplete=True, spoof=spoof))
    stats = run(TrafficSpec(profile="frag", ports=(second.port,), rate=None, count=100, size=4000, spoof=spoof))
    assert (stats.sent, stats.errors) == (100, 0)
    assert second.settle() == 100 and second.sizes == {4000: 100} and second.payloads == {payload(4000)}
    assert first.settle(quiet=0.1) == 0  # the incomplete run's queues were left alone


def test_fallback_over_an_ordinary_socket_delivers_from_127_0_0_1(udp_receiver) -> None:  # type: ignore[no-untyped-def]
    stats = run(TrafficSpec(ports=(udp_receiver.port,), rate=None, count=2000, size=64, spoof=None))  # no root needed
    assert (stats.method, stats.sent, stats.packets, stats.bytes) == ("socket", 2000, 2000, 2000 * 92)
    assert udp_receiver.settle() == 2000
    assert set(udp_receiver.sources) == {"127.0.0.1"} and udp_receiver.sizes == {64: 2000}


def test_mixed_blends_datagrams_fragments_and_tcp(mixed_sinks) -> None:  # type: ignore[no-untyped-def]
    require_root()
    udp, tcp = mixed_sinks
    stats = run(TrafficSpec(profile="mixed", ports=(udp.port,), rate=None, count=1000, size=256, connections=3, spoof="127.24.0.0/16"))
    assert stats.method == "raw+tcp" and stats.connections == 3
    assert udp.settle() == 800  # 6 of every 10 messages plain, 2 fragmented; 2 are TCP writes
    assert udp.sizes == {256: 600, 4000: 200}
    assert tcp.bytes >= 1 and len(tcp.peers) == 3
