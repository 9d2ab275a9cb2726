"""Network counters, nstat-style, and the ss-style socket view.

Counters are plain attributes on a slotted object: the receive stage bumps them for every frame,
so they must cost one attribute increment. Each counter has the kernel MIB name an engineer would
grep for in `nstat -a` (where the kernel has one), shown next to netswap's own name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emu.net.sock import Sock

# ---- verdicts: what the receive path did with one frame ----------------------------------------
# Plain ints (the hot path compares them); VERDICTS names each with its counter and the kernel's
# skb drop reason (include/net/dropreason-core.h), for reports, dropwatch and pcap comments.
QUEUED = 0  # step 8: on a socket's receive queue
FRAG_QUEUED = 1  # step 4: a fragment waiting for the rest of its datagram
NOMEM = 2  # step 1: no memory for the skb
MISSED = 3  # step 1: the RX ring could not be refilled earlier in this poll
NOROUTE = 4  # step 3: no memory / room for a route cache entry
FRAG_NOMEM = 5  # step 4: no memory for a reassembly queue
DUP_FRAG = 6  # step 4: overlaps a fragment already queued
NO_SOCKET = 7  # step 5
PFMEMALLOC = 8  # step 6: a reserve skb for a socket that is not SOCK_MEMALLOC
RCVBUFF = 9  # step 7: over the socket's receive buffer
RESERVE_SKB = 16  # or'ed into a verdict in a capture trace (emu.net.capture): the skb came from the reserve

# verdict -> (netswap counter, kernel drop reason or "" for frames that were not dropped)
VERDICTS: tuple[tuple[str, str], ...] = (
    ("delivered", ""),
    ("frag_queued", ""),
    ("rx_nomem", "SKB_DROP_REASON_NOMEM"),
    ("rx_missed", "SKB_DROP_REASON_NOMEM"),
    ("route_nomem", "SKB_DROP_REASON_IP_INNOROUTES"),
    ("frag_nomem", "SKB_DROP_REASON_NOMEM"),
    ("frag_dup", "SKB_DROP_REASON_DUP_FRAG"),
    ("no_socket", "SKB_DROP_REASON_NO_SOCKET"),
    ("pfmemalloc_drop", "SKB_DROP_REASON_PFMEMALLOC"),
    ("rcvbuf_full", "SKB_DROP_REASON_SOCKET_RCVBUFF"),
)
# Drops of frames already queued in reassembly, and their kernel reasons.
FRAG_DROPS = {"frag_evicted": "SKB_DROP_REASON_FRAG_TOO_FAR", "frag_timeout": "SKB_DROP_REASON_FRAG_REASM_TIMEOUT"}
DROP_COUNTERS = tuple(name for name, reason in VERDICTS if reason) + tuple(FRAG_DROPS)

# netswap name -> (kernel MIB name or "", what it counts)
COUNTERS: dict[str, tuple[str, str]] = {
    "frames": ("IpInReceives", "frames seen by the receive stage (UDP fragments and TCP chunks)"),
    "bytes": ("IpExtInOctets", "bytes in those frames (IP packets)"),
    "skbs": ("", "RX skbs allocated"),
    "skbs_emergency": ("", "RX skbs allocated from the reserve (v12 emergency / 3.6 pfmemalloc)"),
    "rx_nomem": ("", "frames dropped: no memory for the skb (step 1)"),
    "rx_missed": ("", "frames dropped because the RX ring could not be refilled earlier in the same poll"),
    "route_nomem": ("IpOutNoRoutes", "frames dropped: no memory / room for a route cache entry (step 3)"),
    "route_lookups": ("", "route cache lookups"),
    "route_hits": ("", "route cache hits"),
    "route_entries_created": ("", "route cache entries created"),
    "route_gc_freed": ("", "route cache entries freed by garbage collection"),
    "route_overflow": ("", "'dst cache overflow': cache at ip_rt_max_size after GC"),
    "frags": ("IpReasmReqds", "fragments received"),
    "frag_queued": ("", "fragments queued for reassembly"),
    "frag_dup": ("", "fragments dropped: overlapping one already queued"),
    "frag_nomem": ("", "fragments dropped: no memory for a reassembly queue"),
    "frag_reassembled": ("IpReasmOKs", "datagrams reassembled"),
    "frag_evicted": ("IpReasmFails", "reassembly queues evicted above ipfrag_high_thresh"),
    "frag_timeout": ("IpExtReasmTimeout", "reassembly queues expired after ipfrag_time"),
    "no_socket": ("UdpNoPorts", "frames dropped: no socket for the port (step 5)"),
    "pfmemalloc_drop": ("TcpExtPFMemallocDrop", "reserve skbs dropped at a socket that is not memalloc (step 6)"),
    "rcvbuf_full": ("UdpRcvbufErrors", "frames dropped: socket receive buffer full (step 7)"),
    "rcvbuf_bypass": ("", "reserve skbs queued past a full rcvbuf on a memalloc socket"),
    "delivered": ("UdpInDatagrams", "skbs queued on a socket (step 8; TCP chunks included)"),
    "delivered_emergency": ("", "reserve skbs queued on a memalloc socket"),
    "tcp_held": ("TcpExtTCPRcvQDrop", "TCP chunks dropped and held on the wire for re-offer"),
    "tcp_reoffer": ("", "TCP chunks offered again after a retransmission timeout"),
    "tcp_window_closed": ("TcpExtTCPZeroWindowDrop", "times a segment waited for the receive window to open"),
    "tcp_accepted": ("TcpPassiveOpens", "connections accepted by application listeners"),
    "listen_drops": ("TcpExtListenDrops", "connections refused: no memory for the new socket"),
    "tx_skbs": ("IpOutRequests", "TX skbs allocated"),
    "tx_skbs_reserve": ("", "TX skbs allocated from the reserve"),
    "tx_nomem": ("", "sends that failed: no memory for a TX skb"),
    "tx_bytes": ("IpExtOutOctets", "bytes handed to real sockets"),
    "app_read_bytes": ("", "bytes read by socket owners"),
    "wire_eof": ("", "TCP wires that reached end of stream"),
    "wire_errors": ("", "real socket errors seen by a wire"),
}


class NetStat:
    """The counters of one emulated host's network stack."""

    __slots__ = tuple(COUNTERS)

    def __init__(self) -> None:
        for name in COUNTERS:
            setattr(self, name, 0)

    if TYPE_CHECKING:  # the counters are the slots named in COUNTERS, each an int

        def __getattr__(self, name: str) -> int: ...

        def __setattr__(self, name: str, value: int) -> None: ...

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}

    def drops(self) -> dict[str, int]:
        """Every drop reason, by name (the deadlock report prints these)."""
        return {n: getattr(self, n) for n in (*DROP_COUNTERS, "tcp_held")}

    def count(self, verdicts: list[int]) -> None:
        """Add one poll's per-verdict counts (indexed by verdict)."""
        for v, n in enumerate(verdicts):
            if n:
                name = VERDICTS[v][0]
                setattr(self, name, getattr(self, name) + n)

    def nstat(self, nonzero: bool = True) -> str:
        """`nstat -a`-style text: name, value, what it counts."""
        lines = ["#kernel"]
        for name, (mib, what) in COUNTERS.items():
            value = getattr(self, name)
            if nonzero and not value:
                continue
            label = f"{name} ({mib})" if mib else name
            lines.append(f"{label:<44} {value:>12}    # {what}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SockRow:
    """One line of the ss view."""

    netid: str
    state: str
    recv_q: int  # payload bytes queued, unread
    rmem_alloc: int  # truesize charged
    rcvbuf: int
    local: str
    peer: str
    memalloc: bool
    owner: str
    drops: int
    skbs: int
    emergency_skbs: int
    rx_drops: dict[str, int]
    wire: str  # TCP: "held 1.2s rto 0.8s" while a refused chunk waits for re-offer

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["rx_drops"] = dict(self.rx_drops)
        return d


def ss_rows(socks: list[Sock]) -> list[SockRow]:
    rows = []
    for sk in socks:
        rows.append(SockRow(
            netid=sk.proto, state=sk.state, recv_q=sk.rx_queued_bytes, rmem_alloc=sk.sk_rmem_alloc,
            rcvbuf=sk.sk_rcvbuf, local=sk.local_str(), peer=sk.peer_str(),
            memalloc=sk.memalloc, owner=sk.owner_name(), drops=sk.sk_drops,
            skbs=len(sk.receive_queue), emergency_skbs=sk.rx_emergency_skbs(),
            rx_drops=dict(sk.rx_drops), wire=sk.wire_state(),
        ))
    return rows


def ss(socks: list[Sock]) -> str:
    """`ss -m`-style text: one line per socket, with queued bytes, skmem and the memalloc flag."""
    head = (f"{'Netid':<5} {'State':<10} {'Recv-Q':>8} {'rmem':>9} {'rcvbuf':>9} {'skbs':>6} "
            f"{'emerg':>5} {'drops':>7} {'Local Address:Port':<22} {'Peer Address:Port':<22} "
            f"{'flags':<13} owner  wire")
    lines = [head]
    for r in ss_rows(socks):
        flags = "SOCK_MEMALLOC" if r.memalloc else "-"
        lines.append(
            f"{r.netid:<5} {r.state:<10} {r.recv_q:>8} {r.rmem_alloc:>9} {r.rcvbuf:>9} {r.skbs:>6} "
            f"{r.emergency_skbs:>5} {r.drops:>7} {r.local:<22} {r.peer:<22} {flags:<13} {r.owner}"
            + (f"  {r.wire}" if r.wire else ""))
    return "\n".join(lines) + "\n"
