"""`netswap bench rx` runs, measures every path against the same-run baseline, and says so in JSON."""

from __future__ import annotations

import json

from click.testing import CliRunner

from emu.bench.rx import bench_rx


def test_bench_rx_json_reports_each_path_with_its_counters() -> None:
    res = CliRunner().invoke(bench_rx, ["--frames", "3000", "--repeat", "1", "--policy", "pfmemalloc", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    by_mode = {r["name"].split(", ")[1].split(" path")[0]: r for r in out}
    assert set(by_mode) == {"accept", "drop-rcvbuf", "drop-nomem", "drop-reserve"}
    for r in out:
        assert r["figure"] > 0 and r["baseline"] > 0 and r["ratio"] == r["figure"] / r["baseline"]
        assert r["extra"]["counters"]["frames"] == 3000
    c = {m: r["extra"]["counters"] for m, r in by_mode.items()}
    assert c["accept"]["delivered"] == 3000
    assert c["drop-rcvbuf"]["rcvbuf_full"] >= 2990
    # step 1 for every frame: the first of each poll finds no memory, the rest of that poll is missed
    assert c["drop-nomem"]["rx_nomem"] >= 1
    assert c["drop-nomem"]["rx_nomem"] + c["drop-nomem"].get("rx_missed", 0) == 3000
    assert c["drop-reserve"]["pfmemalloc_drop"] == 3000 == c["drop-reserve"]["skbs_emergency"]


def test_bench_rx_usage_errors_name_the_flag() -> None:
    res = CliRunner().invoke(bench_rx, ["--size", "9000"])
    assert res.exit_code == 2 and "--size" in res.output
    res = CliRunner().invoke(bench_rx, ["--mode", "drop-reserve"])
    assert res.exit_code == 2 and "--mode" in res.output
