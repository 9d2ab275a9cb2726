"""Making the machine slower on purpose: CPU hogs, and a cgroup v1 `cpu` quota for a process tree.

A run's verdict must not depend on how fast the machine runs Python (emulated time).  These
helpers give a test the slow and busy machines to check that on.  The cgroup needs the v1 `cpu`
controller at /sys/fs/cgroup/cpu and root: without them the test skips and says why, and fails
under NETSWAP_REQUIRE_PEERS=1 (CI).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from peers import unavailable

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
_groups = itertools.count()


def cgroup_throttled(procs: Path) -> int:
    """How many CFS periods the cgroup whose `cgroup.procs` is `procs` was throttled in."""
    for line in (procs.parent / "cpu.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "nr_throttled":
            return int(value)
    raise LookupError(f"no nr_throttled in {procs.parent / 'cpu.stat'}")


@contextlib.contextmanager
def cpu_hogs(n: int = 2) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`n` processes spinning on the CPU for as long as the block runs (yielded, to measure)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def require_cgroup_cpu() -> None:
    if not (CGROUP_CPU / "cpu.cfs_quota_us").exists():
        unavailable(f"needs the cgroup v1 cpu controller at {CGROUP_CPU} (cpu.cfs_quota_us)")
    if os.geteuid() != 0:
        unavailable("needs root to make a cpu cgroup; run the tests with sudo")


@contextlib.contextmanager
def cpu_quota(fraction: float) -> Iterator[Path]:
    """A child cgroup of the cpu controller limited to `fraction` of one CPU.  Yields the path
    of its `cgroup.procs`: write a pid there and the process and its children run limited."""
    require_cgroup_cpu()
    group = CGROUP_CPU / f"netswap-test-{os.getpid()}-{int(fraction * 100)}-{next(_groups)}"
    group.mkdir(exist_ok=True)
    try:
        period = int((CGROUP_CPU / "cpu.cfs_period_us").read_text())
        (group / "cpu.cfs_period_us").write_text(str(period))
        (group / "cpu.cfs_quota_us").write_text(str(int(period * fraction)))
        yield group / "cgroup.procs"
    finally:
        # Anything left inside goes back to the parent group, then the group can go.
        with contextlib.suppress(OSError):
            for pid in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (CGROUP_CPU / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            group.rmdir()


def _enter(procs: Path | None) -> Callable[[], None]:
    def enter() -> None:
        if procs is not None:
            procs.write_text(str(os.getpid()))

    return enter


def run_limited(argv: list[str], procs: Path | None, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `argv`, inside the cgroup whose `cgroup.procs` is `procs` (with all its children)."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, preexec_fn=_enter(procs))


def start_limited(argv: list[str], procs: Path | None) -> subprocess.Popen[str]:
    """Start `argv` inside the cgroup whose `cgroup.procs` is `procs` (None: unlimited)."""
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_enter(procs))
