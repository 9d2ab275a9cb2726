"""Swapping survives a `kill -9` of the server and its restart on the same ports and storage.

A real server process is killed (SIGKILL) while the emulated host swaps to it with background
traffic running, at the first moment the host has swapped out `KILL_AT_PAGES` pages (an emulated
event, so the kill always lands mid-swap whatever the machine's speed), and started again after
`DOWN_S` wall seconds.  While it is down the clock follows the wall clock and the watchdog holds
(emu.host.watchdog): the run must complete with every page verified, under both reserve
policies, with the reserve the transport had before the kill restored on its new connection.
A server that never comes back ends the run as `server_down` (exit 1), never as a deadlock.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from emu import scenario as scen
from emu.host import run_host
from emu.host.result import RunResult, RunStatus
from emu.net.wire import GRACE_PEER
from restart import RestartableServer

KILL_AT_PAGES = 300
DOWN_S = 1.0


def tiny(backend: str, policy: str) -> scen.Scenario:
    """The demo's host, smaller: 8 MiB of RAM, one process over 9 MiB, 16 MiB of swap, traffic."""
    sc = scen.default().replace(backend=backend, policy=policy)
    sc.host.ram = 8 << 20
    sc.host.swap = 16 << 20
    sc.workload.processes = 1
    sc.workload.working_set = 9 << 20
    sc.workload.passes = 1
    sc.traffic.rate = 20000
    sc.traffic.apps = 8
    return sc


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableServer]:
    kind = "iscsi" if request.param == "iscsi" else "nfs"
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    import tempfile

    with tempfile.TemporaryDirectory(prefix="netswap-restart-", dir=base) as d:
        srv = RestartableServer(kind, Path(d))
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


def run_with_kill(srv: RestartableServer, sc: scen.Scenario, down: float | None) -> tuple[RunResult, dict[str, int]]:
    seen: dict[str, int] = {}

    def progress(st: RunStatus) -> None:
        if "reserve" not in seen and st.pswpout >= KILL_AT_PAGES:
            seen["reserve"] = st.reserve_size
            seen["pswpout"] = st.pswpout
            srv.kill9()
            if down is not None:
                srv.restart_later(down)

    return run_host(sc, srv.endpoint, progress, wall_timeout=240), seen


@pytest.mark.parametrize("policy", ["v12", "pfmemalloc"])
@pytest.mark.parametrize("server", ["nfs-udp", "nfs-tcp", "iscsi"], indirect=True)
def test_kill9_and_restart(server: RestartableServer, request: pytest.FixtureRequest, policy: str) -> None:
    backend = request.node.callspec.params["server"]
    res, seen = run_with_kill(server, tiny(backend, policy), DOWN_S)
    assert "reserve" in seen, "the server was never killed: the host swapped too little"
    assert not server.restart_error, server.restart_error
    assert server.starts == 2
    assert res.outcome == "completed", (res.outcome, res.error, res.server_outages, res.clock, res.server_events[:6],
                                        res.swap_retransmits, res.traffic, res.report[:2000])
    assert res.integrity["mismatches"] == 0 and res.integrity["verified"] > 0, res.integrity
    assert res.pages_swapped_out > seen["pswpout"]  # swapping went on after the restart
    assert res.traffic["offered"] > 0  # with background traffic running
    # the host saw the outage and the server come back
    assert res.server_outages and all(o["up_at"] is not None for o in res.server_outages), res.server_outages
    assert res.clock["realtime_s"] > 0, res.clock
    # the session's reserve term is back on the new connection
    assert seen["reserve"] > 0
    assert res.reserve["size"] == seen["reserve"], (res.reserve, seen)
    if backend == "iscsi":
        msgs = [e["message"] for e in res.server_events]
        assert any("detected conn error" in m for m in msgs), msgs
        assert any("operational after recovery" in m for m in msgs), msgs


@pytest.mark.parametrize("server", ["nfs-tcp"], indirect=True)
def test_server_never_returns(server: RestartableServer) -> None:
    sc = tiny("nfs-tcp", "v12")
    sc.watchdog.timeout = 3.0  # emulated seconds: the run's bound (--duration)
    res, seen = run_with_kill(server, sc, None)
    assert "reserve" in seen
    assert res.outcome == "server_down", (res.outcome, res.error)
    assert res.exit_status == 1
    assert res.stall is None and not res.report  # not a deadlock verdict
    assert "not answering since t=" in res.error, res.error
    assert res.server_outages and res.server_outages[-1]["up_at"] is None


@pytest.mark.parametrize("server", ["nfs-udp"], indirect=True)
def test_a_hung_server_past_the_grace(server: RestartableServer) -> None:
    """SIGSTOP: no refusal, no reset, the replies simply stop. The clock waits its grace (10 wall
    seconds) once for the peer as a whole, not once per reply owed, then follows the wall clock
    until the server answers again (SIGCONT 2 s later)."""
    seen: dict[str, int] = {}

    def progress(st: RunStatus) -> None:
        if "reserve" not in seen and st.pswpout >= KILL_AT_PAGES:
            seen["reserve"] = st.reserve_size
            server.hang_for(GRACE_PEER + 2.0)

    res = run_host(tiny("nfs-udp", "v12"), server.endpoint, progress, wall_timeout=240)
    assert res.outcome == "completed", (res.outcome, res.error, res.server_outages, res.clock)
    assert res.integrity["mismatches"] == 0
    assert res.clock["late"] >= 1 and res.server_outages and res.server_outages[-1]["up_at"] is not None
    # one grace, not one per reply in flight (16 of them would be 160 s)
    assert res.clock["wall_waited"] < 2 * GRACE_PEER + 10, res.clock
