"""The non-root path: without CAP_NET_RAW the background traffic comes from 127.0.0.1 over an
ordinary UDP socket (no spoofed sources, so one route cache entry; the emulated NIC still cuts the
4000-byte datagrams into fragments by its MTU).  Forced here by a parameter (raw_traffic=False),
not by dropping privileges.  The demo's scenario must still show the mechanism over NFS/UDP:
deadlock under `none`, completion under `v12`."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from emu import scenario as scen
from emu.host import RunResult, run_host
from emu.host.servers import ServerProcess, local_server


@pytest.fixture(scope="module")
def nfs_udp() -> Iterator[ServerProcess]:
    with local_server("nfs-udp", scen.default().host.swap) as sp:
        yield sp


def check_plain(res: RunResult) -> None:
    t = res.traffic
    assert t["generator"].startswith("ordinary UDP socket") and t["spoof"] is None, t
    assert "no CAP_NET_RAW" in t["note"], t
    assert t["arrived"] == t["expected"] > 0, t


def test_plain_udp_traffic_still_deadlocks_none(nfs_udp: ServerProcess) -> None:
    res = run_host(scen.default().replace(backend="nfs-udp", policy="none"), nfs_udp.server, raw_traffic=False)
    check_plain(res)
    assert res.outcome == "deadlock", (res.outcome, res.error, res.report[:3000])
    assert res.integrity["mismatches"] == 0
    assert res.drops["rx_nomem"] > 0
    assert res.stall is not None and res.stall["nr_free"] <= res.atomic_floor and res.stall["inflight"] > 0
    # no skb for the replies: rx_nomem, or rx_missed (the ring could not be refilled in that poll)
    assert re.search(r"replies to swap I/O dropped: [^\n]*rx_nomem", res.report)


def test_plain_udp_traffic_completes_v12(nfs_udp: ServerProcess) -> None:
    res = run_host(scen.default().replace(backend="nfs-udp", policy="v12"), nfs_udp.server, raw_traffic=False)
    check_plain(res)
    assert res.outcome == "completed", (res.outcome, res.error, res.report[:3000])
    assert res.integrity["mismatches"] == 0
    assert res.accesses_done == res.accesses_total
    assert res.pages_swapped_out > 0 and res.pages_swapped_in > 0
    assert sum(res.drops.values()) > 0, res.drops  # the traffic arrived and pressed on memory
