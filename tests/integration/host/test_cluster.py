"""The cluster world for real: hosts as OS processes on their own loopback addresses, one server.

Asserted, on NFS/UDP and on iSCSI: four hosts are four clients of the server (its per-client
statistics name 127.0.1.1 to 127.0.1.4, each with its calls, service times and, on iSCSI, its
own initiator name), every host reaches a verdict with its own result and files, the
cluster's counts add up, the figure exists; and a cluster of one host (its own
process, its own address, the server counting per client) gives exactly the run a lone host
gives: the cluster's machinery observes, it does not change the model.  Outcomes of several
hosts sharing the server are not compared with anything: the server's order of work between
clients is real time (README, "Cluster determinism").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emu import scenario as scen
from emu.host.cluster import run_cluster
from emu.host.identity import IQN_PREFIX
from emu.host.launch import run_scenario

TINY = Path(__file__).parents[1] / "sweep" / "tiny.toml"
VERDICTS = ("completed", "deadlock", "livelock")


@pytest.mark.parametrize("backend", ["nfs-udp", "iscsi"])
def test_four_hosts_four_clients(tmp_path: Path, backend: str) -> None:
    out, js, toml = tmp_path / "out", tmp_path / "cluster.json", tmp_path / "tinier.toml"
    # The tiny scenario, one pass over 6 MiB: four hosts in seconds on two busy cores.
    toml.write_text(scen.dumps(scen.set_values(scen.load(TINY), {"workload.passes": 1, "workload.working_set": "6M"})))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).parents[3]) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "emu", "run", str(toml), "--hosts", "4", "--policy", "v12", "-q",
                        "--backend", backend, "--out", str(out), "--json", str(js)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode in (0, 3), r.stderr[-3000:]
    res = json.loads(js.read_text())
    addrs = [f"127.0.1.{i}" for i in range(1, 5)]
    assert res["hosts"] == 4 and res["backend"] == backend and len(res["host_results"]) == 4
    assert [h["addr"] for h in res["host_results"]] == addrs
    for h in res["host_results"]:
        assert h["outcome"] in VERDICTS, h["error"]
        assert h["clock"]["late"] == 0 and h["pages_swapped_out"] > 0
        assert (out / f"host{h['host']}.json").exists()
    assert res["completed"] + res["stuck"] == 4 == sum(res["outcomes"].values())
    assert res["completed"] == sum(h["outcome"] == "completed" for h in res["host_results"])
    assert r.returncode == (3 if res["stuck"] else 0)
    srv = res["server_stats"]
    assert set(srv["clients"]) == set(addrs)  # one server, four distinct clients
    assert srv["calls"] == sum(c["calls"] for c in srv["clients"].values())
    for i, (addr, h) in enumerate(zip(addrs, res["host_results"]), 1):
        c = srv["clients"][addr]
        assert 0 < c["p50_s"] <= c["p99_s"], c
        # The server answered each page the host swapped (one page per READ or WRITE: swap_cluster 1).
        pages = h["pages_swapped_out"] + h["pages_swapped_in"]
        assert c["calls"] >= pages, (addr, c["calls"], pages)
        if backend == "iscsi":  # host i logged in as its own initiator, and only it
            assert c["initiators"] == {f"{IQN_PREFIX}{i}": c["calls"]}
            if h["outcome"] == "completed":  # beyond its pages, only the login's few commands
                assert c["calls"] <= pages + 8, (addr, c["calls"], pages)
    assert 0 < srv["latency_s"]["p50_s"] <= srv["latency_s"]["p99_s"] <= srv["latency_s"]["max_s"]
    assert srv["calls_per_wall_s"] > 0 and srv["rss_peak_kib"] > 0
    assert (out / "cluster.png").stat().st_size > 0


@pytest.mark.parametrize("backend", ["nfs-udp", "iscsi"])
def test_cluster_of_one_is_a_lone_host(tmp_path: Path, backend: str) -> None:
    sc = scen.set_values(scen.load(TINY), {"policy": "none", "backend": backend})
    alone = run_scenario(sc)
    one = run_cluster(scen.set_values(sc, {"cluster.hosts": 1}), out_dir=tmp_path)
    [host] = one.results
    assert alone.clock["late"] == 0 and host.clock["late"] == 0
    assert (host.outcome, host.emulated_s, host.pages_swapped_out, host.pages_swapped_in, host.drops) == \
        (alone.outcome, alone.emulated_s, alone.pages_swapped_out, alone.pages_swapped_in, alone.drops)
    assert set(one.server_stats["clients"]) == {"127.0.1.1"}
    assert one.server_stats["calls"] == one.server_stats["clients"]["127.0.1.1"]["calls"] > 0
