"""A kernel-style drop monitor (`netswap run --dropwatch`): drops per reason and per socket, each
second, as `dropwatch -l kas` prints them from the kernel's `skb:kfree_skb` tracepoint.

Each counter of the receive stage is a `kfree_skb_reason()` call site in a 2.6/5.x kernel; the
line names that site, the drop reason (include/net/dropreason-core.h, Linux 5.17+) and the socket
the frame was for (the emulator knows it even before demux; `(no socket)` when there was none).
It only reads counters (`NetStat`, `Sock.rx_drops`): an observer, it changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emu.net.netstat import FRAG_DROPS, VERDICTS

if TYPE_CHECKING:
    from emu.net.stack import NetStack

# netswap counter -> (kernel function that frees the skb, drop reason)
LOCATIONS: dict[str, tuple[str, str]] = {
    "rx_nomem": ("__netdev_alloc_skb", "SKB_DROP_REASON_NOMEM"),
    "rx_missed": ("e1000_alloc_rx_buffers", "SKB_DROP_REASON_NOMEM"),
    "route_nomem": ("ip_route_input_slow", "SKB_DROP_REASON_IP_INNOROUTES"),
    "frag_nomem": ("ip_defrag", "SKB_DROP_REASON_NOMEM"),
    "frag_dup": ("ip_frag_queue", "SKB_DROP_REASON_DUP_FRAG"),
    "no_socket": ("__udp4_lib_rcv", "SKB_DROP_REASON_NO_SOCKET"),
    "pfmemalloc_drop": ("sk_filter_trim_cap", "SKB_DROP_REASON_PFMEMALLOC"),
    "rcvbuf_full": ("sock_queue_rcv_skb", "SKB_DROP_REASON_SOCKET_RCVBUFF"),
    "frag_evicted": ("ip_evictor", FRAG_DROPS["frag_evicted"]),
    "frag_timeout": ("ip_expire", FRAG_DROPS["frag_timeout"]),
}
assert all(LOCATIONS[n][1] == r for n, r in VERDICTS if r)  # one table of reasons, netstat's


def reason_table(drops: dict[str, int]) -> list[tuple[str, str, str, int]]:
    """(drop reason, counter, kernel site, count) for every nonzero drop counter."""
    return [(LOCATIONS[k][1], k, LOCATIONS[k][0], n) for k, n in drops.items() if n and k in LOCATIONS]


class DropMonitor:
    """Drops since the last `poll()`, per (socket, counter)."""

    def __init__(self, net: NetStack) -> None:
        self.net = net
        self._host: dict[str, int] = {}
        self._socks: dict[int, tuple[str, dict[str, int]]] = {}  # id(sock) -> (name, last counts)

    def _now_socks(self) -> dict[int, tuple[str, dict[str, int]]]:
        out = dict(self._socks)
        for sk in self.net.socks:
            out[id(sk)] = (f"{sk.proto} {sk.local_str()} {sk.owner_name()}", dict(sk.rx_drops))
        return out

    def poll(self) -> list[tuple[str, str, str, int]]:
        """(kernel site, reason, socket, count) of every drop since the last poll, largest first."""
        host = {k: v for k, v in self.net.stat.drops().items() if k in LOCATIONS}
        socks = self._now_socks()
        rows: list[tuple[str, str, str, int]] = []
        attributed: dict[str, int] = {}
        for key, (name, counts) in socks.items():
            before = self._socks.get(key, (name, {}))[1]
            for k, n in counts.items():
                d = n - before.get(k, 0)
                if d > 0 and k in LOCATIONS:
                    rows.append((LOCATIONS[k][0], LOCATIONS[k][1], name, d))
                    attributed[k] = attributed.get(k, 0) + d
        for k, n in host.items():
            rest = n - self._host.get(k, 0) - attributed.get(k, 0)
            if rest > 0:
                rows.append((LOCATIONS[k][0], LOCATIONS[k][1], "(no socket)", rest))
        self._host = host
        self._socks = socks
        rows.sort(key=lambda r: -r[3])
        return rows

    def lines(self, t: float) -> list[str]:
        """`dropwatch -l kas` style text for the drops since the last call, at emulated time t."""
        rows = self.poll()
        if not rows:
            return []
        return [f"t={t:.2f}s {n:>7} drops at {site} [{reason.removeprefix('SKB_DROP_REASON_')}] {sock}"
                for site, reason, sock, n in rows]
