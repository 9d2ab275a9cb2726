"""libiscsi's tools against `netswap serve iscsi` (real peers); the whole conformance suite is in
test_conformance.py."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import require_binary

from emu.peers import iscsi as peer

pytestmark = pytest.mark.peers

@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peer.Daemon]:
    require_binary("iscsi-ls", "iscsi-inq", "iscsi-readcapacity16", "iscsi-test-cu")
    with peer.netswap_target(tmp_path_factory.mktemp("libiscsi"), size="64M") as d:
        yield d


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, errors="replace", timeout=timeout)


def test_iscsi_ls_discovers_and_probes(target: peer.Daemon) -> None:
    r = run("iscsi-ls", "-s", f"iscsi://127.0.0.1:{target.port}")
    assert r.returncode == 0, r.stderr
    assert f"Target:{target.iqn} Portal:127.0.0.1:{target.port},1" in r.stdout
    assert re.search(r"Lun:0\s+Type:DIRECT_ACCESS \(Size:6\dM\)", r.stdout), r.stdout


def test_iscsi_inq(target: peer.Daemon) -> None:
    r = run("iscsi-inq", target.url())
    assert r.returncode == 0, r.stderr
    assert "Vendor:NETSWAP" in r.stdout and "Peripheral Device Type:DIRECT_ACCESS" in r.stdout
    r = run("iscsi-inq", "-e", "1", "-c", str(0x83), target.url())
    assert r.returncode == 0 and "Designator Type:(3) NAA" in r.stdout and "NETSWAP" in r.stdout, r.stdout + r.stderr


def test_iscsi_readcapacity16(target: peer.Daemon) -> None:
    r = run("iscsi-readcapacity16", target.url())
    assert r.returncode == 0, r.stderr
    assert "LOGICAL BLOCK LENGTH IN BYTES:512" in r.stdout
    assert "Total size:67108864" in r.stdout


def test_chap_with_libiscsi(tmp_path: Path) -> None:
    require_binary("iscsi-inq")
    with peer.netswap_target(tmp_path, size="1M", extra=["--chap", "alice:sesame-sesame"]) as d:
        ok = run("iscsi-inq", f"iscsi://alice%sesame-sesame@127.0.0.1:{d.port}/{d.iqn}/0")
        assert ok.returncode == 0 and "Vendor:NETSWAP" in ok.stdout, ok.stderr
        bad = run("iscsi-inq", f"iscsi://alice%wrong-wrong-wrong@127.0.0.1:{d.port}/{d.iqn}/0")
        assert bad.returncode != 0
        anon = run("iscsi-inq", f"iscsi://127.0.0.1:{d.port}/{d.iqn}/0")
        assert anon.returncode != 0


def test_conformance_with_header_digests(target: peer.Daemon) -> None:
    # libiscsi then offers only HeaderDigest=CRC32C: every PDU both ways carries a CRC32C.
    url = target.url() + "?header_digest=crc32c"
    r = run("iscsi-test-cu", "-d", "-t", "SCSI.Read10.*,SCSI.Write10.*,iSCSI.iSCSIResiduals.*", url, timeout=120)
    out = r.stdout + r.stderr
    summary = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out)
    assert summary and int(summary.group(4)) == 0 and int(summary.group(3)) >= 15, out[-3000:]
    assert r.returncode == 0


def test_several_luns_with_libiscsi(tmp_path: Path) -> None:
    require_binary("iscsi-ls", "iscsi-readcapacity16")
    with peer.netswap_target(tmp_path, size="2M", luns=2, extra=["--thin"]) as d:
        r = run("iscsi-ls", "-s", f"iscsi://127.0.0.1:{d.port}")
        assert r.returncode == 0, r.stderr
        assert re.search(r"Lun:0\s+Type:DIRECT_ACCESS", r.stdout) and re.search(r"Lun:1\s+Type:DIRECT_ACCESS", r.stdout), r.stdout
        cap = run("iscsi-readcapacity16", d.url(1))
        assert cap.returncode == 0 and "Total size:2097152" in cap.stdout and "LBPME:1" in cap.stdout, cap.stdout
        assert run("iscsi-readcapacity16", d.url(2)).returncode != 0  # no LUN 2
