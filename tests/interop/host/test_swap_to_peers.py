"""The emulated host swaps to real peers: a swap file on nfs-ganesha (NFSv3 over UDP and TCP)
and an iSCSI LUN on tgtd, with every page verified when it comes back.
Needs root and the Debian peers; CI runs these with NETSWAP_REQUIRE_PEERS=1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from peers import require_binary, require_root

from emu import scenario as scen
from emu.host import run_host
from emu.swapdev.endpoint import parse_server_url

pytestmark = pytest.mark.peers


def _scenario(backend: str, policy: str) -> scen.Scenario:
    sc = scen.default().replace(backend=backend, policy=policy)
    sc.host.swap = 32 << 20
    sc.workload.working_set = 14 << 20
    return sc


@pytest.mark.parametrize("backend", ["nfs-udp", "nfs-tcp"])
def test_swap_file_on_ganesha(tmp_path: Path, backend: str) -> None:
    require_root()
    require_binary("ganesha.nfsd", "rpcbind")
    from emu.peers.nfs import ganesha

    with ganesha(tmp_path / "ganesha", tmpfs_size="96m") as g:
        url = f"nfs://127.0.0.1{g.export_path}?nfsport={g.nfs_port}&mountport={g.mount_port}"
        res = run_host(_scenario(backend, "pfmemalloc"), parse_server_url(url))
        assert res.outcome == "completed", res.report[:3000]
        assert res.integrity["mismatches"] == 0 and res.pages_swapped_in > 0
        swapfile = g.export / "netswap.swap"
        assert swapfile.stat().st_size == 32 << 20            # made exactly the swap size ...
        assert swapfile.stat().st_blocks * 512 >= 32 << 20     # ... and preallocated: no holes


def test_run_command_swaps_to_tgtd(tmp_path: Path) -> None:
    """`netswap run --server iscsi://...` against tgtd's LUN 1, end to end through the CLI."""
    require_root()
    require_binary("tgtd", "tgtadm")
    from emu.peers import iscsi as peer

    out = tmp_path / "r.json"
    with peer.tgtd(tmp_path / "tgtd", size=64 << 20, digests=False) as d:
        url = f"iscsi://127.0.0.1:{d.port}/{d.iqn}/{d.lun}"
        r = subprocess.run([sys.executable, "-m", "emu", "run", "--backend", "iscsi", "--policy", "v12",
                            "--swap", "32M", "--server", url, "--json", str(out), "-q", "--duration", "60"],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["outcome"] == "completed" and res["server"] == url
    assert res["integrity"]["mismatches"] == 0 and res["pages_swapped_out"] > 0 and res["pages_swapped_in"] > 0
