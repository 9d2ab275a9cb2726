"""Per-initiator command counts and service times of the target, in bounded memory.

For each client address: SCSI commands answered, bytes in and out, the initiator names that
logged in from it (with their commands), and a histogram of service times (wall clock, from the
arrival of a SCSI Command PDU to its SCSI Response, or its last Data-In, handed to the socket)
in log-spaced buckets, 20 per decade from 1 us to 100 s, so a percentile is known to within 12%.
At most `max_clients` addresses are kept; commands from any further address count under "other".

The JSON is the shape `netswap serve nfs --stats` writes (nfs/clientstats.py: "clients" keyed
by address, each with "calls" and "latency" p50/p90/p99), so one reader serves both servers.
The histogram is written again here rather than shared: `iscsi` and `nfs` are libraries that
stand alone (ARCHITECTURE, "Duplicates we keep on purpose").  This observes; it decides nothing.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

BUCKETS_PER_DECADE = 20
LOW = 1e-6  # 1 us
DECADES = 8  # up to 100 s
NBUCKETS = BUCKETS_PER_DECADE * DECADES + 2  # + below LOW, + above the top
MAX_INITIATOR_NAMES = 64  # per address; further names count under "other"
# Below 1 ms a table indexed by the time in tenths of a microsecond gives the bucket: a list
# index instead of a log10 (0.4 us a call, most of what counting cost per answer).  A value is
# bucketed as its 0.1 us floor is: a sample within 0.1 us above an edge lands one bucket low.
TABLE_STEP = 1e-7
TABLE_LEN = 10_000


def bucket_of(seconds: float) -> int:
    if seconds < LOW:
        return 0
    return min(1 + int(math.log10(seconds / LOW) * BUCKETS_PER_DECADE), NBUCKETS - 1)


_TABLE = [bucket_of(i * TABLE_STEP) for i in range(TABLE_LEN)]


def bucket_upper(b: int) -> float:
    """The upper edge of bucket b, in seconds (what a percentile falling in it is reported as)."""
    return LOW * 10 ** (b / BUCKETS_PER_DECADE)


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * NBUCKETS)
    n: int = 0
    total: float = 0.0
    max: float = 0.0

    def add(self, seconds: float, k: int = 1) -> None:
        """`k` samples of `seconds` (the commands answered by one write that arrived in one read)."""
        i = int(seconds * 1e7)
        self.counts[_TABLE[i] if 0 <= i < TABLE_LEN else bucket_of(seconds)] += k
        self.n += k
        self.total += seconds * k
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.n += other.n
        self.total += other.total
        self.max = max(self.max, other.max)

    def percentile(self, q: float) -> float:
        if not self.n:
            return 0.0
        want = q / 100 * self.n
        seen = 0
        for b, c in enumerate(self.counts):
            seen += c
            if seen >= want and c:
                return min(bucket_upper(b), self.max)
        return self.max

    def summary(self) -> dict[str, float]:
        return {"calls": self.n, "mean_s": self.total / self.n if self.n else 0.0,
                "p50_s": self.percentile(50), "p90_s": self.percentile(90), "p99_s": self.percentile(99),
                "max_s": self.max}

    def to_json(self) -> dict[str, Any]:
        return {"counts": {str(b): c for b, c in enumerate(self.counts) if c}, "n": self.n, "total": self.total,
                "max": self.max}


@dataclass
class ClientStat:
    """One client address: what its sessions sent and how long their commands took."""

    calls: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    sessions: int = 0  # normal sessions logged in from it (I_T nexuses, reinstatements included)
    initiators: dict[str, int] = field(default_factory=dict)  # initiator name -> commands answered
    latency: Histogram = field(default_factory=Histogram)

    def answered(self, name: str, arrivals: list[float], sent: float) -> None:
        """The commands whose answers one write just handed to the socket at `sent`; `arrivals`
        holds each one's arrival time.  Commands that arrived in one read share their arrival
        time, so nearly always this is one histogram update for the whole batch."""
        n = len(arrivals)
        self.calls += n
        self.initiators[name] += n  # `login` put the name there
        first = arrivals[0]
        if n == 1 or (arrivals[-1] == first and arrivals.count(first) == n):
            self.latency.add(sent - first, n)
            return
        for t, k in Counter(arrivals).items():
            self.latency.add(sent - t, k)


class TargetStats:
    def __init__(self, max_clients: int = 1024) -> None:
        self.max_clients = max_clients
        self.clients: dict[str, ClientStat] = {}

    def login(self, addr: str, initiator_name: str) -> tuple[ClientStat, str]:
        """A normal session logged in: the record its commands go to, and the name they count under."""
        st = self.clients.get(addr)
        if st is None:
            if len(self.clients) >= self.max_clients:
                addr = "other"
            st = self.clients.setdefault(addr, ClientStat())
        st.sessions += 1
        if initiator_name not in st.initiators:
            if len(st.initiators) >= MAX_INITIATOR_NAMES:
                initiator_name = "other"
            st.initiators.setdefault(initiator_name, 0)
        return st, initiator_name

    @property
    def calls(self) -> int:
        return sum(s.calls for s in self.clients.values())

    def total(self) -> Histogram:
        h = Histogram()
        for s in self.clients.values():
            h.merge(s.latency)
        return h

    def to_json(self) -> dict[str, Any]:
        """What `netswap serve iscsi --stats FILE` writes: per client, then the whole target."""
        clients = {addr: {"calls": s.calls, "bytes_in": s.bytes_in, "bytes_out": s.bytes_out, "sessions": s.sessions,
                          "initiators": dict(sorted(s.initiators.items())), "latency": s.latency.summary(),
                          "histogram": s.latency.to_json()}
                   for addr, s in sorted(self.clients.items())}
        return {"clients": clients, "latency": self.total().summary(), "calls": self.calls}


__all__ = ["ClientStat", "Histogram", "TargetStats", "bucket_of", "bucket_upper"]
