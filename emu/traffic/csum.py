"""Incremental Internet checksum update (RFC 1624), as the kernel's csum_replace4() does.

scapy builds each packet's bytes once; variants that differ only in a source address are derived
by patching the address and fixing the UDP checksum here, far faster than rebuilding with scapy.
"""

from __future__ import annotations


def _fold(x: int) -> int:
    while x >> 16:
        x = (x & 0xFFFF) + (x >> 16)
    return x


def csum_replace(check: int, old: bytes, new: bytes) -> int:
    """Return checksum `check` updated for `old` bytes (even length) replaced by `new`: RFC 1624 eqn 3,
    HC' = ~(~HC + ~m + m')."""
    acc = ~check & 0xFFFF
    for i in range(0, len(old), 2):
        acc += (~((old[i] << 8) | old[i + 1])) & 0xFFFF
        acc += (new[i] << 8) | new[i + 1]
    return ~_fold(acc) & 0xFFFF


def udp_csum_replace(check: int, old: bytes, new: bytes) -> int:
    """As csum_replace for a UDP checksum field: 0 means "no checksum" and stays 0, and a computed 0
    is sent as 0xFFFF (RFC 768)."""
    if check == 0:
        return 0
    return csum_replace(check, old, new) or 0xFFFF
