"""The traffic profiles and the packets they are made of.

Packets are built with scapy ONCE into a pool of raw bytes (scapy builds ~4,000
packets/s, a raw socket sends several hundred thousand), then the pool is cycled by the sender.
Variants with other spoofed sources and IP IDs are derived from scapy's bytes by patching those
fields (csum.py keeps the UDP checksum right); the kernel fills in the IP header checksum and total
length for IPPROTO_RAW sends (raw(7)).
"""

from __future__ import annotations

import enum
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from emu.traffic.csum import udp_csum_replace
from emu.traffic.target import Target

SPORT = 40000  # UDP source port of injected datagrams (ordinary sockets use an ephemeral one)
IP_HLEN = 20  # scapy's IP() has no options
UDP_HLEN = 8
IPV4_MAX_PAYLOAD = 65535 - IP_HLEN - UDP_HLEN  # largest UDP payload over IPv4: 65507
POOL_BYTES = 32 << 20  # a pool never holds more than this; big datagrams get fewer variants


class Profile(str, enum.Enum):
    UDP_FLOOD = "udp-flood"  # datagrams to one or many ports, sources spoofed across a range
    FRAG = "frag"  # datagrams larger than the MTU as IP fragments (optionally missing the last)
    TCP_STREAM = "tcp-stream"  # many real TCP connections streaming to listening ports
    MIXED = "mixed"  # a blend of the three

    def __str__(self) -> str:
        return self.value


DEFAULT_SIZE = {Profile.UDP_FLOOD: 512, Profile.FRAG: 4000, Profile.TCP_STREAM: 16384, Profile.MIXED: 512}
MIXED_FRAG_SIZE = 4000  # the frag share of `mixed` uses datagrams this big (3 fragments at 1480)
# `mixed` sends, out of every 10 messages: 6 plain datagrams, 2 fragmented ones, 2 TCP writes.
MIXED_SHARES = {Profile.UDP_FLOOD: 0.6, Profile.FRAG: 0.2, Profile.TCP_STREAM: 0.2}


@dataclass(frozen=True)
class Datagram:
    """One UDP datagram as it goes on the wire: one IP packet, or several fragments."""

    packets: tuple[bytes, ...]
    dst: tuple[str, int]  # sendto() address for IPPROTO_RAW: (destination, 0)
    port: int = 0  # the UDP destination port inside the packets

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.packets)


def payload(size: int) -> bytes:
    pattern = b"netswap background traffic "
    return (pattern * (size // len(pattern) + 1))[:size]


def _template(src: str, target: Target, size: int, ip_id: int) -> bytes:
    from scapy.layers.inet import IP, UDP  # heavy import, paid only when packets are built
    from scapy.packet import Raw

    return bytes(IP(src=src, dst=target.host, id=ip_id, flags=0) / UDP(sport=SPORT, dport=target.port) / Raw(payload(size)))


def _patch(pkt: bytes | bytearray, src: bytes | None, ip_id: int | None, udp: bool) -> bytes:
    """Return `pkt` with its source address and/or IP ID replaced (UDP checksum fixed when the UDP
    header is in this packet, i.e. unfragmented or the first fragment)."""
    b = bytearray(pkt)
    if ip_id is not None:
        struct.pack_into("!H", b, 4, ip_id)
    if src is not None and src != b[12:16]:
        if udp:
            (check,) = struct.unpack_from("!H", b, IP_HLEN + 6)
            struct.pack_into("!H", b, IP_HLEN + 6, udp_csum_replace(check, bytes(b[12:16]), src))
        b[12:16] = src
    struct.pack_into("!H", b, 10, 0)  # IP header checksum: the kernel always fills it in for IP_HDRINCL
    return bytes(b)


def _src_bytes(sources: Sequence[str]) -> list[bytes]:
    import socket

    return [socket.inet_aton(s) for s in sources]


def udp_pool(targets: Sequence[Target], sources: Sequence[str], size: int, distinct: int) -> list[Datagram]:
    """Up to `distinct` unfragmented datagrams, cycling over targets and sources together."""
    n = max(len(targets), min(distinct, len(targets) * len(sources), POOL_BYTES // (size + IP_HLEN + UDP_HLEN)))
    srcs = _src_bytes(sources)
    templates = {t: _template(sources[0], t, size, 1) for t in targets}
    pool = []
    for i in range(n):
        t, src = targets[i % len(targets)], srcs[i % len(srcs)]
        pool.append(Datagram((_patch(templates[t], src, None, udp=True),), (t.host, 0), t.port))
    return pool


def frag_pool(
    targets: Sequence[Target],
    sources: Sequence[str],
    size: int,
    distinct: int,
    fragsize: int,
    incomplete: bool,
    id_base: int | None = None,
) -> list[Datagram]:
    """Up to `distinct` datagrams of `size` payload bytes, each cut by scapy's fragment() into IP
    fragments of `fragsize` payload bytes; with `incomplete`, the last fragment of each is left out
    so the kernel holds the rest in its reassembly queue until ipfrag_time expires.

    Each datagram gets its own (source, IP ID): the kernel's fragment queues are keyed by
    (saddr, daddr, id, protocol), so no two datagrams of one pool ever share a queue. The IDs
    start at a random offset per pool (`id_base`, 0..65534; fixed only by tests): queues left by
    an earlier run (an --incomplete one above all) live for ipfrag_time, and a run that reused
    their IDs over the same sources would have its fragments joined to those leftovers.
    """
    from scapy.layers.inet import IP, fragment

    wire = size + UDP_HLEN + IP_HLEN * -(-(size + UDP_HLEN) // fragsize)  # bytes on the wire per datagram
    # (source, ID) pairs are the limit, not (target, source, ID): the queue key has no port.
    n = max(len(targets), min(distinct, len(sources) * 65535, POOL_BYTES // wire))
    srcs = _src_bytes(sources)
    base = random.randrange(65535) if id_base is None else id_base % 65535
    frags = {t: [bytes(f) for f in fragment(IP(_template(sources[0], t, size, 1)), fragsize=fragsize)] for t in targets}
    pool = []
    for i in range(n):
        t, src = targets[i % len(targets)], srcs[i % len(srcs)]
        ip_id = 1 + (base + i // len(srcs)) % 65535  # never 0: the kernel would pick a new ID per fragment
        pieces = frags[t][:-1] if incomplete else frags[t]
        packets = tuple(_patch(f, src, ip_id, udp=(k == 0)) for k, f in enumerate(pieces))
        pool.append(Datagram(packets, (t.host, 0), t.port))
    return pool
