"""The server's per-client statistics: percentiles from log buckets, bounded memory."""

from __future__ import annotations

import random

from nfs.clientstats import ClientStats, Histogram, bucket_of, bucket_upper


def test_percentiles_within_a_bucket() -> None:
    rng = random.Random(7)
    xs = sorted(rng.lognormvariate(-7, 1.0) for _ in range(5000))
    h = Histogram()
    for x in xs:
        h.add(x)
    for q in (50, 90, 99):
        exact = xs[int(q / 100 * len(xs)) - 1]
        assert exact <= h.percentile(q) <= exact * 10 ** (1 / 20) * 1.0001  # one bucket: 12%
    assert h.percentile(100) == h.max == xs[-1]
    assert bucket_of(0.0) == 0 and bucket_upper(bucket_of(1e-3)) >= 1e-3


def test_clients_are_bounded_and_merged() -> None:
    cs = ClientStats(max_clients=2)
    for host in ("127.0.1.1", "127.0.1.2", "127.0.1.3", "127.0.1.4"):
        cs.record(host, 100, 10, 0.001)
    cs.record("127.0.1.1", 100, 10, 0.002)
    j = cs.to_json()
    assert set(j) == {"127.0.1.1", "127.0.1.2", "other"}
    assert j["127.0.1.1"]["calls"] == 2 and j["other"]["calls"] == 2
    assert cs.total().n == 5
    again = Histogram.from_json(j["127.0.1.1"]["histogram"])
    assert again.n == 2 and again.percentile(50) == cs.clients["127.0.1.1"].latency.percentile(50)
