"""Per-client call counts and service times of a server, in bounded memory.

For each client address: calls, bytes in and out, and a histogram of service times (wall clock,
from a call's dispatch to its reply handed to the socket) in log-spaced buckets, 20 per decade
from 1 us to 100 s, so a percentile is known to within 12%.  At most `max_clients` addresses are
kept; calls from any further address count under "other".  This is what the server observes of
its clients; it decides nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

BUCKETS_PER_DECADE = 20
LOW = 1e-6  # 1 us
DECADES = 8  # up to 100 s
NBUCKETS = BUCKETS_PER_DECADE * DECADES + 2  # + below LOW, + above the top


def bucket_of(seconds: float) -> int:
    if seconds < LOW:
        return 0
    b = 1 + int(math.log10(seconds / LOW) * BUCKETS_PER_DECADE)
    return min(b, NBUCKETS - 1)


def bucket_upper(b: int) -> float:
    """The upper edge of bucket b, in seconds (what a percentile falling in it is reported as)."""
    return LOW * 10 ** (b / BUCKETS_PER_DECADE)


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * NBUCKETS)
    n: int = 0
    total: float = 0.0
    max: float = 0.0

    def add(self, seconds: float) -> None:
        self.counts[bucket_of(seconds)] += 1
        self.n += 1
        self.total += seconds
        self.max = max(self.max, seconds)

    def merge(self, other: "Histogram") -> None:
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

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Histogram":
        h = cls()
        for b, c in d.get("counts", {}).items():
            h.counts[int(b)] = int(c)
        h.n, h.total, h.max = int(d.get("n", 0)), float(d.get("total", 0.0)), float(d.get("max", 0.0))
        return h


@dataclass
class ClientStat:
    calls: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    latency: Histogram = field(default_factory=Histogram)


class ClientStats:
    def __init__(self, max_clients: int = 1024) -> None:
        self.max_clients = max_clients
        self.clients: dict[str, ClientStat] = {}

    def record(self, host: str, bytes_in: int, bytes_out: int, seconds: float) -> None:
        st = self.clients.get(host)
        if st is None:
            if len(self.clients) >= self.max_clients:
                host = "other"
            st = self.clients.setdefault(host, ClientStat())
        st.calls += 1
        st.bytes_in += bytes_in
        st.bytes_out += bytes_out
        st.latency.add(seconds)

    def total(self) -> Histogram:
        h = Histogram()
        for s in self.clients.values():
            h.merge(s.latency)
        return h

    def to_json(self) -> dict[str, Any]:
        return {host: {"calls": s.calls, "bytes_in": s.bytes_in, "bytes_out": s.bytes_out,
                       "latency": s.latency.summary(), "histogram": s.latency.to_json()}
                for host, s in sorted(self.clients.items())}


__all__ = ["ClientStats", "Histogram", "bucket_of", "bucket_upper"]
