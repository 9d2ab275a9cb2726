"""Each backend under each policy, end to end, with real servers in separate processes.

The demo's scenario runs under `none`, `v12` and `pfmemalloc`: `none` must deadlock by the receive
path's rule (the swap replies dropped for want of an skb, free memory at the GFP_ATOMIC floor),
the reserve policies must complete with every page verified.  The host runs in emulated time, so
this is the model's verdict, not a race with the machine (test_machine_independence.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from emu import scenario as scen
from emu.host import RunResult, run_host
from emu.host.servers import ServerProcess, local_server

EXPECTED = {"none": "deadlock", "v12": "completed", "pfmemalloc": "completed"}


@pytest.fixture(scope="module", params=["nfs-udp", "nfs-tcp", "iscsi"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, ServerProcess]]:
    with local_server(request.param, scen.default().host.swap) as sp:
        yield request.param, sp


def check(res: RunResult, policy: str) -> None:
    assert res.outcome == EXPECTED[policy], (res.outcome, res.error, res.report[:3000])
    assert res.integrity["mismatches"] == 0, res.integrity
    assert res.pages_swapped_out > 0
    assert res.traffic["arrived"] == res.traffic["expected"] > 0, res.traffic  # loopback lost nothing
    assert res.clock["late"] == 0, res.clock  # no real input ever overran its grace
    if policy == "none":
        # The mechanism: replies dropped at skb allocation, memory pinned at the atomic floor.
        assert res.drops["rx_nomem"] > 0
        assert res.stall is not None and res.stall["nr_free"] <= res.atomic_floor
        assert res.stall["inflight"] > 0
        # stuck for the watchdog's whole stall window, in emulated seconds
        assert res.stall["stalled_for"] >= scen.default().watchdog.stall
        r = res.report
        assert f"DEADLOCK — policy none, backend {res.backend}" in r
        # no skb for the replies: rx_nomem, or rx_missed (the ring could not be refilled in that poll)
        assert re.search(r"replies to swap I/O dropped: [^\n]*rx_nomem", r)
        assert "GFP_ATOMIC floor" in r and "(reached)" in r
        assert "skbs queued on sockets" in r and " app0 " in r
        assert "IPv4 route cache:" in r and "IPv4 fragment queues:" in r and "slabinfo" in r
        assert "Swap I/O in flight" in r and "write slot" in r
        assert "SysRq : Show Blocked State" in r and "D " in r
    else:
        assert res.accesses_done == res.accesses_total
        # every workload page was read back and checked at the end
        assert res.integrity["verified"] >= scen.default().workload.working_set // 4096
        assert res.pages_swapped_in > 0
        assert res.report == ""
        assert res.emergency_skbs > 0  # the reserve was reached: replies came from it


@pytest.mark.parametrize("policy", ["none", "v12", "pfmemalloc"])
def test_backend_policy(server: tuple[str, ServerProcess], policy: str) -> None:
    backend, sp = server
    res = run_host(scen.default().replace(backend=backend, policy=policy), sp.server)
    assert res.backend == backend and res.policy == policy
    assert res.seed == scen.default().workload.seed and res.costs["peer_rtt"] > 0
    assert res.clock["emulated_s"] == res.emulated_s and res.wall_s > 0
    check(res, policy)
