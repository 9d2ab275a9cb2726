"""`netswap bench nfs` end to end, small: every copy byte-checked against both servers, every
row's figure, baseline and ratio, and each server's own CPU time per copy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from peers import require_binary, require_root

pytestmark = pytest.mark.peers


def test_bench_nfs_rows_and_server_cpu() -> None:
    require_root()
    require_binary("ganesha.nfsd", "rpcbind", "nfs-cp", "nfs-cat")
    r = subprocess.run([sys.executable, "-m", "emu", "bench", "nfs", "--size", "8M", "--udp-size", "2M",
                        "--rounds", "2", "--no-warmup", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert [(x["extra"]["transport"], x["extra"]["direction"]) for x in rows] == [
        ("tcp", "in"), ("tcp", "out"), ("udp", "in"), ("udp", "out")]
    assert [x["name"].split(",")[0] for x in rows] == ["TCP into: nfs-cp", "TCP out of: nfs-cat", "UDP into: netswap client",
                                                       "UDP out of: netswap client"]
    for x in rows:
        assert x["figure"] > 0 and x["baseline"] > 0 and x["ratio"] == pytest.approx(x["figure"] / x["baseline"])
        # Each round's own ratio: the same copy's seconds, ganesha's over ours, that round.
        assert x["rounds"] == pytest.approx([g / o for o, g in zip(x["extra"]["seconds_ours"], x["extra"]["seconds_ganesha"])])
        for who in ("ours", "ganesha"):
            assert len(x["extra"][f"seconds_{who}"]) == 2 and all(s > 0 for s in x["extra"][f"seconds_{who}"])
            assert len(x["extra"][f"server_cpu_s_{who}"]) == 2 and all(c >= 0 for c in x["extra"][f"server_cpu_s_{who}"])
    # Each server really served: 20 MiB of copies cost each some CPU (in 10 ms ticks).
    assert sum(sum(x["extra"]["server_cpu_s_ours"]) for x in rows) > 0
    assert sum(sum(x["extra"]["server_cpu_s_ganesha"]) for x in rows) > 0
