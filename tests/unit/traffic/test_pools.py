"""Packet pools and the mixed blend, checked byte by byte (no sockets)."""

from __future__ import annotations

import math
import socket
import struct

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP

from emu.traffic.mixed import Blend
from emu.traffic.profiles import POOL_BYTES, frag_pool, payload, udp_pool
from emu.traffic.spec import InjectStats
from emu.traffic.target import Target, parse_spoof, spread_sources

T = [Target("127.0.0.1", 9000), Target("127.0.0.1", 9001)]


def test_frag_pool_gives_every_datagram_its_own_reassembly_queue() -> None:
    sources = spread_sources(parse_spoof("127.64.0.0/10"), 3)
    pool = frag_pool(T, sources, 4000, 500, 1480, incomplete=False)
    assert len(pool) == 500
    keys = set()
    for d in pool:
        assert len(d.packets) == 3
        heads = [struct.unpack_from("!4sH", p, 12)[0] for p in d.packets]  # saddr of each fragment
        ids = {struct.unpack_from("!H", p, 4)[0] for p in d.packets}
        assert len(set(heads)) == 1 and len(ids) == 1 and 0 not in ids
        keys.add((heads[0], ids.pop()))
        offsets = [struct.unpack_from("!H", p, 6)[0] for p in d.packets]
        assert [o & 0x1FFF for o in offsets] == [0, 185, 370] and [o >> 13 for o in offsets] == [1, 1, 0]  # MF on all but the last
    assert len(keys) == 500  # (saddr, id) never repeats within the pool


def test_first_fragment_carries_a_checksum_valid_for_the_whole_datagram() -> None:
    (d,) = frag_pool(T[:1], ["127.70.1.2"], 3000, 1, 1480, incomplete=False)
    whole = IP(src="127.70.1.2", dst="127.0.0.1") / UDP(sport=40000, dport=9000) / payload(3000)
    assert struct.unpack_from("!H", d.packets[0], 26)[0] == IP(bytes(whole))[UDP].chksum
    assert b"".join(p[20:] for p in d.packets)[8:] == payload(3000)


def test_incomplete_leaves_out_exactly_the_last_fragment() -> None:
    full = frag_pool(T, ["127.1.1.1"], 6000, 4, 1480, incomplete=False, id_base=77)
    cut = frag_pool(T, ["127.1.1.1"], 6000, 4, 1480, incomplete=True, id_base=77)
    assert [d.packets for d in cut] == [d.packets[:-1] for d in full]


def _ids(pool: list) -> list[int]:  # type: ignore[type-arg]
    return [struct.unpack_from("!H", d.packets[0], 4)[0] for d in pool]


def test_each_frag_pool_starts_its_ip_ids_somewhere_new() -> None:
    # Runs over the same sources must not reuse IDs, or they meet an earlier run's leftover
    # reassembly queues. Five pools all starting at one ID by chance: 1 in 65535**4.
    starts = {_ids(frag_pool(T[:1], ["127.1.1.1"], 3000, 2, 1480, incomplete=True))[0] for _ in range(5)}
    assert len(starts) > 1


def test_ip_ids_wrap_past_65535_without_ever_being_zero() -> None:
    ids = _ids(frag_pool(T[:1], ["127.1.1.1"], 3000, 4, 1480, incomplete=False, id_base=65533))
    assert ids == [65534, 65535, 1, 2]


def test_one_source_never_repeats_an_ip_id_even_over_several_ports() -> None:
    # The queue key is (saddr, daddr, id, protocol): no port. So one source gives at most 65535
    # distinct datagrams, however many ports there are.
    pool = frag_pool(T, ["127.1.1.1"], 100, 65536, 64, incomplete=True)
    assert len(pool) == 65535 and len(set(_ids(pool))) == 65535


def test_udp_pool_cycles_sources_and_ports() -> None:
    sources = spread_sources(parse_spoof("127.64.0.0/10"), 100)
    pool = udp_pool(T, sources, 64, 1000)
    assert len(pool) == 200  # every (source, port) pair once: 100 x 2
    srcs = {socket.inet_ntoa(d.packets[0][12:16]) for d in pool}
    ports = {struct.unpack_from("!H", d.packets[0], 22)[0] for d in pool}
    assert srcs == set(sources) and ports == {9000, 9001}


def test_pools_stay_within_their_memory_cap() -> None:
    sources = spread_sources(parse_spoof("127.64.0.0/10"), 65536)
    pool = frag_pool(T[:1], sources, 65507, 65536, 1480, incomplete=False)
    assert sum(d.nbytes for d in pool) <= POOL_BYTES


class _Counting:
    def __init__(self) -> None:
        self.offered = 0

    def send(self, n: int, stats: InjectStats) -> int:
        self.offered += n
        return n

    def wait(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        pass


@given(st.lists(st.integers(1, 300), min_size=1, max_size=40))
def test_blend_never_exceeds_the_grant_and_keeps_its_shares(batches: list[int]) -> None:
    a, b, c = _Counting(), _Counting(), _Counting()
    blend = Blend([(a, 0.6), (b, 0.2), (c, 0.2)])
    stats = InjectStats("mixed", "raw")
    total = 0
    for n in batches:
        before = a.offered + b.offered + c.offered
        assert blend.send(n, stats) == n
        total += n
        assert a.offered + b.offered + c.offered - before == n  # exactly the pacer's grant
        for sender, share in ((a, 0.6), (b, 0.2), (c, 0.2)):
            assert abs(sender.offered - total * share) <= 3


def test_blend_is_exact_when_batches_allow() -> None:
    a, b, c = _Counting(), _Counting(), _Counting()
    blend = Blend([(a, 0.6), (b, 0.2), (c, 0.2)])
    for n in (7, 256, 256, 1, 80):
        blend.send(n, InjectStats("mixed", "raw"))
    assert (a.offered, b.offered, c.offered) == (360, 120, 120) and math.isclose(360 / 600, 0.6)
