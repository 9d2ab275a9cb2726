"""`netswap bench iscsi` end to end, short: every workload against both targets, its IOPS and
ratio, and each target's own CPU time per operation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from peers import require_binary, require_root

pytestmark = pytest.mark.peers


def test_bench_iscsi_rows_and_target_cpu() -> None:
    require_root()
    require_binary("tgtd", "tgtadm", "iscsi-perf")
    r = subprocess.run([sys.executable, "-m", "emu", "bench", "iscsi", "--seconds", "2", "--rounds", "1",
                        "--size", "4M", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert [x["name"].split(",")[0] for x in rows] == [
        "iscsi-perf 4 KiB reads", "random 4 KiB writes", "random 4 KiB writes + SYNCHRONIZE CACHE"]
    for x in rows:
        assert x["figure"] > 0 and x["baseline"] > 0 and x["ratio"] == pytest.approx(x["figure"] / x["baseline"])
        assert len(x["extra"]["netswap_runs"]) == 1 and len(x["extra"]["tgtd_runs"]) == 1
        assert x["rounds"] == pytest.approx([x["extra"]["netswap_runs"][0] / x["extra"]["tgtd_runs"][0]])
        for who in ("netswap", "tgtd"):
            assert len(x["extra"][f"{who}_cpu_us_per_op"]) == 1 and x["extra"][f"{who}_cpu_us_per_op"][0] >= 0
    # Each target really worked: thousands of operations cost each some CPU (10 ms ticks).
    assert sum(x["extra"]["netswap_cpu_us_per_op"][0] for x in rows) > 0
    assert sum(x["extra"]["tgtd_cpu_us_per_op"][0] for x in rows) > 0
