"""The cluster world for real: hosts as OS processes on their own loopback addresses, one server.

Asserted: the server sees each host as a client of its own (its per-client statistics name
127.0.1.1 and 127.0.1.2, each with its calls), every host reaches a verdict with its own result
and files, the cluster's counts add up, the figure exists; and a cluster of one host (its own
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

from emu import scenario as scen
from emu.host.cluster import run_cluster
from emu.host.launch import run_scenario

TINY = Path(__file__).parents[1] / "sweep" / "tiny.toml"
VERDICTS = ("completed", "deadlock", "livelock")


def test_two_hosts_two_clients(tmp_path: Path) -> None:
    out, js = tmp_path / "out", tmp_path / "cluster.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).parents[3]) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "emu", "run", str(TINY), "--hosts", "2", "--policy", "v12", "-q",
                        "--out", str(out), "--json", str(js)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode in (0, 3), r.stderr[-3000:]
    res = json.loads(js.read_text())
    assert res["hosts"] == 2 and len(res["host_results"]) == 2
    assert [h["addr"] for h in res["host_results"]] == ["127.0.1.1", "127.0.1.2"]
    for h in res["host_results"]:
        assert h["outcome"] in VERDICTS, h["error"]
        assert h["clock"]["late"] == 0 and h["pages_swapped_out"] > 0
        assert (out / f"host{h['host']}.json").exists()
    assert res["completed"] + res["stuck"] == 2
    assert r.returncode == (3 if res["stuck"] else 0)
    srv = res["server_stats"]
    assert set(srv["clients"]) == {"127.0.1.1", "127.0.1.2"}  # one server, two distinct clients
    assert all(c["calls"] > 0 for c in srv["clients"].values())
    assert srv["calls"] == sum(c["calls"] for c in srv["clients"].values())
    assert 0 < srv["latency_s"]["p50_s"] <= srv["latency_s"]["p99_s"] <= srv["latency_s"]["max_s"]
    assert srv["rss_peak_kib"] > 0
    assert (out / "cluster.png").stat().st_size > 0


def test_cluster_of_one_is_a_lone_host(tmp_path: Path) -> None:
    sc = scen.set_values(scen.load(TINY), {"policy": "none"})
    alone = run_scenario(sc)
    one = run_cluster(scen.set_values(sc, {"cluster.hosts": 1}), out_dir=tmp_path)
    [host] = one.results
    assert alone.clock["late"] == 0 and host.clock["late"] == 0
    assert (host.outcome, host.emulated_s, host.pages_swapped_out, host.pages_swapped_in, host.drops) == \
        (alone.outcome, alone.emulated_s, alone.pages_swapped_out, alone.pages_swapped_in, alone.drops)
    assert set(one.server_stats["clients"]) == {"127.0.1.1"}
