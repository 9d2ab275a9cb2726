"""PacketTap without a host: frames become IPv4 packets scapy parses back (fragments reassemble
to the datagram), fates become packet comments, TCP sequence numbers follow the stream (a
dropped segment offered again keeps its number), the snaplen cuts only background frames, and
the ring keeps the last bytes and counts what it left out."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet import defragment
from scapy.utils import PcapNgReader

from emu.net.capture import RESERVE, PacketTap, fate
from emu.net.netstat import FRAG_QUEUED, NOMEM, PFMEMALLOC, QUEUED


def sock(proto: str = "udp", memalloc: bool = False) -> SimpleNamespace:
    return SimpleNamespace(proto=proto, laddr="127.0.0.1", lport=2049, raddr="127.0.0.2", rport=700,
                           memalloc=memalloc, local_str=lambda: "127.0.0.1:2049", owner_name=lambda: "nfs")


def read(path: Path) -> list:
    with PcapNgReader(str(path)) as r:
        return list(r)


def test_fates_name_the_kernel_drop_reason() -> None:
    assert fate(QUEUED) == "RX delivered"
    assert fate(PFMEMALLOC | RESERVE, "pfmemalloc") == \
        "RX dropped: SKB_DROP_REASON_PFMEMALLOC (pfmemalloc_drop); skb from the reserve (pfmemalloc)"
    assert fate(NOMEM) == "RX dropped: SKB_DROP_REASON_NOMEM (rx_nomem)"


def test_udp_frames_and_fragments_round_trip(tmp_path: Path) -> None:
    tap = PacketTap(reserve_name="v12 emergency")
    big = bytes(range(256)) * 16  # 4096 bytes: 3 fragments at MTU 1500
    frames = [(0.0, b"hello", "127.64.0.9", 5000), (0.0, big, "127.64.0.10", 5001)]
    tap.udp(frames, "127.0.0.1", 9000, None, [QUEUED, FRAG_QUEUED, FRAG_QUEUED, PFMEMALLOC | RESERVE], 1.5)
    assert tap.rx_frames == 4 and tap.counts[PFMEMALLOC] == 1 and tap.reserve_frames == 1
    p = tmp_path / "x.pcapng"
    assert tap.write(str(p), "test") == 4
    pkts = read(p)
    assert [bytes(x[UDP].payload) for x in pkts[:1]] == [b"hello"]
    assert pkts[0][IP].src == "127.64.0.9" and pkts[0][UDP].dport == 9000
    assert [x.comments[0].decode() if x.comments else "" for x in pkts] == \
        ["RX delivered", "RX fragment queued for reassembly", "RX fragment queued for reassembly",
         "RX dropped: SKB_DROP_REASON_PFMEMALLOC (pfmemalloc_drop); skb from the reserve (v12 emergency)"]
    whole = [x for x in defragment(pkts[1:]) if UDP in x]
    assert bytes(whole[0][UDP].payload) == big
    assert abs(float(pkts[0].time) - 1.5) < 1e-6


def test_tcp_sequence_follows_the_stream_and_a_reoffer_repeats_it(tmp_path: Path) -> None:
    tap = PacketTap()
    sk = sock("tcp", memalloc=True)
    tap.tx(sk, b"call" * 10, None, 0.1, 1448)
    tap.tcp(sk, b"A" * 100, NOMEM, False, 0.2)  # dropped: held
    tap.tcp(sk, b"A" * 100, QUEUED, True, 0.4)  # offered again after the RTO
    tap.tcp(sk, b"B" * 50, QUEUED, False, 0.4)
    p = tmp_path / "t.pcapng"
    tap.write(str(p))
    pkts = read(p)
    seqs = [(x[TCP].sport, x[TCP].seq) for x in pkts]
    assert seqs == [(2049, 1), (700, 1), (700, 1), (700, 101)]
    assert pkts[1].comments[0].decode() == "RX dropped: SKB_DROP_REASON_NOMEM (rx_nomem), for tcp 127.0.0.1:2049 nfs"
    assert pkts[2].comments[0].decode() == "RX delivered to tcp 127.0.0.1:2049 nfs; skb from the reserve (reserve)"
    assert pkts[0].comments[0] == b"TX" and pkts[3][TCP].ack == 41


def test_snaplen_cuts_background_frames_not_swap_traffic(tmp_path: Path) -> None:
    tap = PacketTap(snaplen=64)
    tap.udp([(0.0, b"x" * 1000, "127.64.0.1", 1)], "127.0.0.1", 9000, sock(memalloc=False), [QUEUED], 0.0)
    tap.udp([(0.0, b"y" * 1000, "127.0.0.2", 2049)], "127.0.0.1", 800, sock(memalloc=True), [QUEUED], 0.0)
    p = tmp_path / "s.pcapng"
    tap.write(str(p))
    lens = [len(bytes(x)) for x in read(p)]
    assert lens == [64, 1028]


def test_ring_keeps_the_last_bytes_and_counts_the_rest() -> None:
    tap = PacketTap(ring_bytes=20_000)
    for i in range(100):
        tap.udp([(0.0, bytes(1000), "127.64.0.1", 1)], "127.0.0.1", 9000, None, [QUEUED], float(i))
    assert tap.left_out > 0 and len(tap.ring) + tap.left_out == 100 and tap.ring_bytes <= 20_000
    assert tap.ring[-1][0] == 99.0  # the newest stay
    assert "left out" in tap.summary()
    tap.stop()
    tap.udp([(0.0, b"late", "127.64.0.1", 1)], "127.0.0.1", 9000, None, [QUEUED], 100.0)
    assert tap.ring[-1][0] == 99.0  # nothing after the result was taken
