"""The path to a real peer, modelled: serialization on the wire, the round trip, and which bytes
are replies to which requests.

The host's storage servers are real processes on loopback that answer in microseconds or, on a
busy machine, in milliseconds.  The model says how long a request takes on a LAN instead: a
request leaves when the NIC's transmit queue gets to it (`PeerLink.depart`: one frame after the
other at the link rate), and its reply is due a round trip later, plus the reply's own
serialization.  The wire of the connection registers each reply it expects with the host's clock
(`emu.kernel.clock`), which then neither lets the reply be seen earlier nor lets time pass its
due time before the real bytes are in.

A `Framer` (one per connection, supplied by the protocol's user: emu/swapdev has RPC and iSCSI
ones) tells requests and replies apart in the byte stream: `sent(data)` gives the tags of the
requests in `data` that expect a reply (an RPC xid, an iSCSI Initiator Task Tag), and
`received(data)` cuts received bytes into replies, each with its tag.  Without a framer a peer's
bytes are processed when they arrive.
"""

from __future__ import annotations

from typing import Protocol

Tag = object


class Framer(Protocol):
    """Requests and replies of one connection (stateful for a byte stream).

    `in_order`: whether replies must be delivered in stream order (iSCSI: StatSN), or may each be
    placed by its own due time (RPC replies stand alone, matched by xid)."""

    in_order: bool

    def sent(self, data: bytes | bytearray | memoryview) -> list[Tag]:
        """Tags of the requests that `data` completes and that expect a reply."""
        ...

    def received(self, data: bytes | bytearray | memoryview) -> list[tuple[int, Tag | None, bool]]:
        """`data` cut at message boundaries: (bytes, tag of the reply the piece belongs to or None,
        whether the piece ends its message)."""
        ...


class PeerLink:
    """One real peer as the model sees it: `rtt` seconds away over a link of `rate` bits/s."""

    def __init__(self, name: str, rtt: float, rate: float) -> None:
        if not rtt >= 0 or not rate > 0:
            raise ValueError("a peer link needs rtt >= 0 and rate > 0")
        self.name = name
        self.rtt = rtt
        self.rate = rate
        self.tx_free = 0.0  # when the transmit queue is empty again (emulated time)
        self.requests = 0
        self.replies = 0

    def depart(self, now: float, nbytes: int) -> float:
        """When `nbytes` queued now have left the NIC (frames go out one after the other)."""
        start = self.tx_free if self.tx_free > now else now
        self.tx_free = end = start + nbytes * 8.0 / self.rate
        return end

    def serialization(self, nbytes: int) -> float:
        return nbytes * 8.0 / self.rate

    def __repr__(self) -> str:
        return f"<PeerLink {self.name} rtt={self.rtt * 1e6:.0f}us {self.rate / 1e9:g}Gbit/s>"
