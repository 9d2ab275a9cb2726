"""Real iSCSI peers on loopback, for interop tests and `netswap bench iscsi`: tgtd, netswap's own
target as a subprocess (`netswap serve iscsi`), and libiscsi's conformance suite with an honest
count of what it really ran.

Every daemon started here is stopped on exit (SIGTERM, then SIGKILL), also when the body fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from emu.util.ports import free_port, port_open
from emu.util.procs import stop_process

H = "127.0.0.1"
TGT_IQN = "iqn.2024-01.test:tgt"
TGT_LUN = 1  # LUN 0 is tgt's controller
NETSWAP_IQN = "iqn.2024-01.org.netswap:disk"
SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"


class PeerError(RuntimeError):
    """A peer daemon could not be started."""


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    port: int
    iqn: str
    lun: int
    path: Path  # the first LUN's backing file
    stderr: Path | None = None

    def url(self, lun: int | None = None) -> str:
        return f"iscsi://{H}:{self.port}/{self.iqn}/{self.lun if lun is None else lun}"


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerError(f"daemon exited with status {proc.returncode}")
        if port_open(port):
            return
        time.sleep(0.05)
    raise PeerError(f"nothing listens on {H}:{port} after {timeout}s")


@contextlib.contextmanager
def tgtd(workdir: str | os.PathLike[str], *, size: int = 64 << 20, digests: bool = True, thin: bool = False,
         port: int | None = None) -> Iterator[Daemon]:
    """tgtd (needs root) serving a fresh file as LUN 1 of TGT_IQN; `thin` sets tgt's
    thin_provisioning=1 (UNMAP, WRITE SAME with UNMAP, GET LBA STATUS)."""
    tgtd_bin = shutil.which("tgtd", path=SBIN)
    tgtadm_bin = shutil.which("tgtadm", path=SBIN)
    if not tgtd_bin or not tgtadm_bin:
        raise FileNotFoundError("tgtd/tgtadm not found (apt-get install tgt)")
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    img = wd / "lun1.img"
    with open(img, "wb") as f:
        f.truncate(size)
    env = dict(os.environ, TGT_IPC_SOCKET=str(wd / "tgtd.socket"))
    log_path = wd / "tgtd.log"
    for attempt in range(3):
        # A free port is bound by tgtd a moment later: if another process took it first, tgtd
        # runs on without its portal (it logs so); then it starts again on another port.
        use = port or free_port()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([tgtd_bin, "-f", "--iscsi", f"portal={H}:{use}"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        if port is not None or attempt == 2 or not _portal_failed(log_path, proc):
            break
        stop_process(proc, grace=1.0)
    port = use
    try:
        def adm(*args: str) -> None:
            for _ in range(100):
                r = subprocess.run([tgtadm_bin, "--lld", "iscsi", *args], env=env, capture_output=True)
                if r.returncode == 0:
                    return
                if proc.poll() is not None:
                    raise PeerError(f"tgtd exited: {log_path.read_text(errors='replace')[-500:]}")
                time.sleep(0.05)
            raise PeerError(f"tgtadm {' '.join(args)}: {r.stderr.decode(errors='replace')}")

        adm("--op", "new", "--mode", "target", "--tid", "1", "-T", TGT_IQN)
        adm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", str(img), "--blocksize=512")
        if thin:
            adm("--op", "update", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "--params", "thin_provisioning=1")
        adm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
        if digests:
            # tgt answers None to a CRC32C offer unless the target allows digests.
            adm("--op", "update", "--mode", "target", "--tid", "1", "--name", "HeaderDigest", "--value", "CRC32C,None")
            adm("--op", "update", "--mode", "target", "--tid", "1", "--name", "DataDigest", "--value", "CRC32C,None")
        _wait_port(port, proc)
        yield Daemon(proc, port, TGT_IQN, TGT_LUN, img, log_path)
    finally:
        stop_process(proc, grace=1.0)  # tgtd ignores SIGTERM while it has targets: then SIGKILL


def _portal_failed(log_path: Path, proc: subprocess.Popen[bytes]) -> bool:
    """Whether tgtd said it could not bind its portal (it says so first thing, or starts its
    event loop and says nothing of it)."""
    deadline = time.monotonic() + 5
    while proc.poll() is None and time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if "failed to create/bind to portal" in text:
            return True
        if "bs_init" in text:  # (its backing-store setup, after the portals)
            return False
        time.sleep(0.02)
    return False


@contextlib.contextmanager
def netswap_target(workdir: str | os.PathLike[str], *, size: str = "64M", extra: Sequence[str] = (),
                   iqn: str = NETSWAP_IQN, luns: int = 1) -> Iterator[Daemon]:
    """`netswap serve iscsi` in a subprocess on a free port, `luns` LUNs (lun0.img, lun1.img, ...);
    waits for its ready line."""
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    imgs = [wd / f"lun{i}.img" for i in range(luns)]
    cmd = [sys.executable, "-m", "emu", "serve", "iscsi", *(a for img in imgs for a in ("--lun", str(img))),
           "--size", size, "--port", "0", "--iqn", iqn, *extra]
    err_path = wd / "target.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline().decode() if ready else ""
        if " ready on " not in line:
            raise PeerError(f"netswap serve iscsi did not start: {line!r} {err_path.read_text(errors='replace')[-800:]}")
        port = int(line.split(" ready on ")[1].split()[0].rsplit(":", 1)[1])
        yield Daemon(proc, port, iqn, 0, imgs[0], err_path)
    finally:
        stop_process(proc)
        if proc.stdout:
            proc.stdout.close()


# --- libiscsi's conformance suite ------------------------------------------------------------------

_SUITE = re.compile(r"^Suite: (\S+)")
_TEST = re.compile(r"^  Test: (\S+) \.\.\.(.*)$")
_SUMMARY = re.compile(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)")


@dataclass
class Conformance:
    """What `iscsi-test-cu -V` really did. CUnit counts a test that skipped itself as passed; with
    -V a test whose output ends in a "[SKIPPED]" line skipped itself, so it is counted apart."""

    passed: list[str] = field(default_factory=list)  # really ran and passed
    failed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # test -> its skip line
    returncode: int = 0
    cunit_total: int = 0  # CUnit's own "tests" summary: total, failed
    cunit_failed: int = 0
    output: str = ""

    @property
    def ran(self) -> int:
        return len(self.passed) + len(self.failed)

    def line(self) -> str:
        return (f"{len(self.passed)} really ran and passed, {len(self.failed)} failed, {len(self.skipped)} skipped "
                f"themselves (CUnit: {self.cunit_total} tests, {self.cunit_failed} failed)")


def parse_conformance(output: str) -> Conformance:
    """Count iscsi-test-cu -V output per test, keyed Suite.Test."""
    result = Conformance(output=output)
    suite = ""
    current: str | None = None
    lines: list[str] = []

    def finish(test: str, verdict: str) -> None:
        last = next((ln.strip() for ln in reversed(lines) if ln.strip()), "")
        if verdict.startswith("FAILED"):
            result.failed.append(test)
        elif "[SKIPPED]" in last:
            result.skipped[test] = last
        else:
            result.passed.append(test)

    for line in output.splitlines():
        if current is None:
            m = _SUITE.match(line)
            if m:
                suite = m.group(1)
                continue
        m = _TEST.match(line)
        if m:
            current, rest = f"{suite}.{m.group(1)}", m.group(2)
            lines = []
            if rest.startswith(("passed", "FAILED")):  # a test that printed nothing
                finish(current, rest)
                current = None
            elif rest.strip():
                lines.append(rest)
            continue
        if current is None:
            continue
        if line.startswith(("passed", "FAILED")):  # CUnit's verdict follows the test's own output
            finish(current, line)
            current = None
        else:
            lines.append(line)
    summary = _SUMMARY.search(output)
    if summary:
        result.cunit_total, result.cunit_failed = int(summary.group(1)), int(summary.group(4))
    return result


def run_conformance(urls: Sequence[str], *, tests: str = "ALL", initiators: tuple[str, str] | None = None,
                    sanitize: bool = False, timeout: float = 600) -> Conformance:
    """`iscsi-test-cu -d -V -t TESTS URL [URL2]` (data-destroying tests allowed; with two URLs
    the multipath tests run; `initiators` gives -i/-I, the two names persistent reservation tests
    register; `sanitize` adds -S)."""
    exe = shutil.which("iscsi-test-cu")
    if exe is None:
        raise FileNotFoundError("iscsi-test-cu not found (apt-get install libiscsi-bin)")
    cmd = [exe, "-d", "-V", "-t", tests]
    if sanitize:
        cmd.append("-S")
    if initiators:
        cmd += ["-i", initiators[0], "-I", initiators[1]]
    r = subprocess.run([*cmd, *urls], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                       timeout=timeout)
    result = parse_conformance(r.stdout)
    result.returncode = r.returncode
    return result
