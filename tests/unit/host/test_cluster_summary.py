"""The cluster's server summary and table from our iSCSI target's own statistics.

A real `TargetStats` (what `netswap serve iscsi --stats` writes) for two hosts' addresses goes
through `_server_summary` and `cluster_table`: each host's row shows the calls and p50/p99 the
target saw from its address, with its initiator name in the JSON, as for NFS."""

from __future__ import annotations

import json

from rich.console import Console

from emu.host.cluster import ClusterResult, _server_summary
from emu.host.identity import IQN_PREFIX, host_addr
from emu.host.report import cluster_table
from emu.host.result import RunResult
from emu.kernel.policy import Policy
from iscsi.target_stats import TargetStats


def test_iscsi_server_summary_per_host() -> None:
    stats = TargetStats()
    for i, (n, lat) in enumerate(((300, 100e-6), (50, 2e-3)), 1):
        st, name = stats.login(host_addr(i), f"{IQN_PREFIX}{i}")
        st.answered(name, [0.0] * n, lat)
    js = json.loads(json.dumps(stats.to_json()))  # as read back from the file
    results = [RunResult("completed", Policy.V12, "iscsi", "iscsi://127.0.0.1:3260/iqn/0", 4 << 20, 4096,
                         pages_swapped_out=100, pages_swapped_in=50) for _ in range(2)]
    s = _server_summary(js, 30_000, results, 2.0, 4096)
    assert (s["calls"], s["calls_per_wall_s"]) == (350, 175.0)
    assert s["clients"]["127.0.1.1"]["initiators"] == {f"{IQN_PREFIX}1": 300}
    assert s["clients"]["127.0.1.2"]["calls"] == 50
    assert 100e-6 <= s["clients"]["127.0.1.1"]["p99_s"] < 2e-3 <= s["clients"]["127.0.1.2"]["p50_s"]
    assert s["latency_s"]["p50_s"] < s["latency_s"]["p99_s"] and "drc_hits" not in s and "note" not in s
    res = ClusterResult(2, "iscsi", Policy.V12, "iscsi://127.0.0.1:3260/iqn/0", "split", results, wall_s=2.0,
                        server_stats=s)
    console = Console(record=True, width=200)
    cluster_table(console, res)
    text = console.export_text()
    p50 = s["clients"]["127.0.1.2"]["p50_s"] * 1e3
    assert "300 0.10/0.10" in text and f"50 {p50:.2f}/{p50:.2f}" in text, text
    assert "350 calls (175.0/s) from 2 clients" in text
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80, text  # the README's promise
