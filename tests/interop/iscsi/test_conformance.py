"""libiscsi's conformance suite against `netswap serve iscsi --thin`, counted honestly.

CUnit counts a test that skipped itself as passed. With -V a test whose output ends in a
"[SKIPPED]" line skipped itself, so `parse_conformance` counts what really ran, and these tests
assert on that: the whole suite, one URL, two initiator names (persistent reservations), SANITIZE
allowed (for the write-protect test); then the multipath tests with two URLs.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from peers import require_binary

from emu.peers import iscsi as peer

pytestmark = pytest.mark.peers

INITIATORS = ("iqn.2024-01.test:conformance-1", "iqn.2024-01.test:conformance-2")
REALLY_RUN_AT_LEAST = 185
# Families that must really run here now, not skip themselves as "not implemented".
MUST_RUN = [
    "PrinReadKeys.Simple", "PrinReadKeys.Truncate", "PrinReportCapabilities.Simple", "PrinServiceactionRange.Range",
    "ProutRegister.Simple", "ProutReserve.Simple", "ProutReserve.AccessEA", "ProutReserve.OwnershipWERO",
    "ProutClear.Simple", "ProutPreempt.RemoveRegistration",
    "Unmap.Simple", "Unmap.ZeroBlocks", "GetLBAStatus.Simple", "GetLBAStatus.UnmapSingle", "Inquiry.BlockLimits",
    "WriteSame10.Unmap", "WriteSame16.UnmapUntilEnd", "WriteSame10.ZeroBlocks", "WriteSame16.ZeroBlocks",
    "OrWrite.Simple", "OrWrite.Verify", "OrWrite.DpoFua", "Sanitize.Readonly", "ModeSense6.Control-SWP",
    "Reserve6.LUNReset", "Reserve6.TargetWarmReset", "ExtendedCopy.Simple", "ReceiveCopyResults.CopyStatus",
    "iSCSITMF.LUNResetSimpleAsync", "iSCSIcmdsn.iSCSICmdSnTooHigh", "Read16.Simple", "Write16.Simple",
]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peer.Daemon]:
    require_binary("iscsi-test-cu")
    with peer.netswap_target(tmp_path_factory.mktemp("conformance"), size="64M",
                             extra=["--thin", "--nop-interval", "0"]) as d:
        yield d


def test_whole_suite_really_runs_and_passes(target: peer.Daemon) -> None:
    result = peer.run_conformance([target.url()], initiators=INITIATORS, sanitize=True, timeout=240)
    summary = result.line()
    assert result.cunit_total == 230, summary + result.output[-2000:]
    assert result.failed == [] and result.returncode == 0, f"{summary}: {result.failed}"
    assert len(result.passed) >= REALLY_RUN_AT_LEAST, summary
    ran = set(result.passed)
    missing = [t for t in MUST_RUN if t not in ran]
    assert not missing, f"skipped themselves: {[(t, result.skipped.get(t)) for t in missing]}"
    # What is left skips for reasons a writable, fixed, single-path disk cannot change
    # (removable media, a LUN write-protected from the start, multipath, SANITIZE, WRITE ATOMIC).
    assert not [t for t, why in result.skipped.items() if "PERSISTENT RESERVE" in why or "fully provisioned" in why]


def test_multipath_tests_with_two_urls(target: peer.Daemon) -> None:
    url = target.url()
    result = peer.run_conformance([url, url], tests="SCSI.MultipathIO.*", initiators=INITIATORS, timeout=120)
    assert result.failed == [] and result.returncode == 0, result.line()
    assert sorted(result.passed) == ["MultipathIO.CompareAndWrite", "MultipathIO.CompareAndWriteAsync",
                                     "MultipathIO.Reset", "MultipathIO.Simple"], result.line()


def test_counting_tells_skips_from_runs() -> None:
    out = """
Suite: Alpha
  Test: Ran ...
    Send READ10 (Expecting SUCCESS)
    [OK] READ10 returned SUCCESS
passed
  Test: Skipped ...    [SKIPPED] THING is not implemented.
passed
  Test: Quiet ...passed
Suite: Beta
  Test: Ran ...
    [SKIPPED] looked like a skip once
    but went on
passed
  Test: Broken ...
    [FAILED] nope
FAILED
    1. test.c:1  - CU_FAIL
  Test: SkipThenBlank ...    [SKIPPED] Multipath unavailable

passed
Run Summary:    Type  Total    Ran Passed Failed Inactive
               tests      6      6      5      1        0
"""
    r = peer.parse_conformance(out)
    assert r.passed == ["Alpha.Ran", "Alpha.Quiet", "Beta.Ran"]
    assert r.failed == ["Beta.Broken"]
    assert set(r.skipped) == {"Alpha.Skipped", "Beta.SkipThenBlank"}
    assert (r.cunit_total, r.cunit_failed) == (6, 1)
