"""libiscsi's tools and conformance suite against `netswap serve iscsi` (real peers)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import require_binary

from emu.peers import iscsi as peer

pytestmark = pytest.mark.peers

# The SBC families whose every test must pass, besides all of iSCSI.*.
FAMILIES = [
    "iSCSI.*",
    "SCSI.Read6.*", "SCSI.Read10.*", "SCSI.Read12.*", "SCSI.Read16.*",
    "SCSI.Write10.*", "SCSI.Write12.*", "SCSI.Write16.*",
    "SCSI.WriteVerify10.*", "SCSI.WriteVerify12.*", "SCSI.WriteVerify16.*",
    "SCSI.Verify10.*", "SCSI.Verify12.*", "SCSI.Verify16.*",
    "SCSI.ReadCapacity10.*", "SCSI.ReadCapacity16.*",
    "SCSI.Inquiry.*", "SCSI.TestUnitReady.*", "SCSI.ModeSense6.*", "SCSI.ReportSupportedOpcodes.*",
    "SCSI.WriteSame10.*", "SCSI.WriteSame16.*", "SCSI.Prefetch10.*", "SCSI.Prefetch16.*",
    "SCSI.CompareAndWrite.*",
]
# Tests that must really run here, not skip themselves as "not implemented".
MUST_RUN = ["Read10", "Write10", "Read16", "Write16", "ReadCapacity16", "Inquiry", "WriteSame10", "WriteSame16", "Prefetch10", "Prefetch16", "CompareAndWrite"]


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


def test_conformance_suite(target: peer.Daemon) -> None:
    r = run("iscsi-test-cu", "-d", "-t", ",".join(FAMILIES), target.url(), timeout=150)
    out = r.stdout + r.stderr
    results = re.findall(r"^\s+Test: (\S+) \.\.\.(.*)$", out, re.M)
    assert results, out[-2000:]
    failed = [name for name, rest in results if "FAILED" in rest]
    summary = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out)
    assert summary, out[-2000:]
    total, ran, passed, nfailed = map(int, summary.groups())
    assert nfailed == 0 and passed == ran == total, f"failed: {failed}\n{out[-4000:]}"
    assert r.returncode == 0
    suites = re.findall(r"^Suite: (\S+)", out, re.M)
    assert {"iSCSIcmdsn", "iSCSIdatasn", "iSCSIResiduals", "iSCSITMF"} <= set(suites)
    # The core SBC suites really ran (a target may make a test skip itself by not implementing it).
    for suite in MUST_RUN:
        assert f"[SKIPPED] {suite.upper()} is not implemented" not in out
    assert "REPORT_SUPPORTED_OPCODES is not implemented" not in out  # so the DpoFua tests ran


def test_conformance_with_header_digests(target: peer.Daemon) -> None:
    # libiscsi then offers only HeaderDigest=CRC32C: every PDU both ways carries a CRC32C.
    url = target.url() + "?header_digest=crc32c"
    r = run("iscsi-test-cu", "-d", "-t", "SCSI.Read10.*,SCSI.Write10.*,iSCSI.iSCSIResiduals.*", url, timeout=120)
    out = r.stdout + r.stderr
    summary = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", out)
    assert summary and int(summary.group(4)) == 0 and int(summary.group(3)) >= 15, out[-3000:]
    assert r.returncode == 0
