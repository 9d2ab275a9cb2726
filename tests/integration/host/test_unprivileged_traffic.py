"""The non-root path: without CAP_NET_RAW the background traffic is plain UDP over an ordinary
socket (no spoofed sources, so one route cache entry; no IP fragments). Forced here by a
parameter (raw_traffic=False), not by dropping privileges. The demo's default scenario must still
show the mechanism over NFS/UDP: deadlock under `none`, completion under `v12`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from emu import scenario as scen
from emu.host import run_host
from emu.servers import ServerProcess, local_server


@pytest.fixture(scope="module")
def nfs_udp() -> Iterator[ServerProcess]:
    with local_server("nfs-udp", scen.default().host.swap) as sp:
        yield sp


def scenario(policy: str) -> scen.Scenario:
    sc = scen.default().replace(backend="nfs-udp", policy=policy)
    sc.watchdog.stall = 2.5
    sc.watchdog.timeout = 45.0
    return sc


def check_plain(res) -> None:  # type: ignore[no-untyped-def]
    t = res.traffic
    assert t["generator"] == "emu.traffic (ordinary socket)" and t["spoof"] is None, t
    assert t["profile"] == "udp-flood" and "no CAP_NET_RAW" in t["fallback"], t
    assert res.drops.get("frag_nomem", 0) == 0  # no fragments were sent


async def test_plain_udp_traffic_still_deadlocks_none(nfs_udp: ServerProcess) -> None:
    res = await run_host(scenario("none"), nfs_udp.server, raw_traffic=False)
    check_plain(res)
    assert res.outcome == "deadlock", (res.outcome, res.report[:3000])
    assert res.integrity["mismatches"] == 0
    assert res.drops["rx_nomem"] > 0
    assert res.stall is not None and res.stall["nr_free"] <= res.atomic_floor and res.stall["inflight"] > 0
    assert "replies to swap I/O dropped: rx_nomem" in res.report


async def test_plain_udp_traffic_completes_v12(nfs_udp: ServerProcess) -> None:
    res = await run_host(scenario("v12"), nfs_udp.server, raw_traffic=False)
    check_plain(res)
    assert res.outcome == "completed", (res.outcome, res.report[:3000])
    assert res.integrity["mismatches"] == 0
    assert res.accesses_done == res.accesses_total
    assert res.pages_swapped_out > 0 and res.pages_swapped_in > 0
    assert sum(res.drops.values()) > 0, res.drops  # the traffic arrived and pressed on memory
