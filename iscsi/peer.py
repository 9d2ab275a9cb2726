"""Run the iSCSI daemons the interop tests and the benchmark compare: tgtd and `netswap serve iscsi`.

Both as context managers that always stop what they started (SIGTERM, then SIGKILL), on loopback
ports picked free at start.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TGT_IQN = "iqn.2024-01.test:tgt"
TGT_LUN = 1  # LUN 0 is tgt's controller


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    port: int
    iqn: str
    lun: int
    path: Path

    def url(self) -> str:
        return f"iscsi://127.0.0.1:{self.port}/{self.iqn}/{self.lun}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with status {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@contextlib.contextmanager
def tgtd(workdir: str | os.PathLike[str], *, size: int = 64 << 20, digests: bool = True, port: int | None = None) -> Iterator[Daemon]:
    """tgtd (needs root) serving a fresh file as LUN 1 of TGT_IQN (DESIGN §9 recipe)."""
    tgtd_bin = shutil.which("tgtd", path="/usr/sbin:/sbin:/usr/bin:/bin")
    tgtadm_bin = shutil.which("tgtadm", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not tgtd_bin or not tgtadm_bin:
        raise FileNotFoundError("tgtd/tgtadm not found (apt-get install tgt)")
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    img = wd / "lun1.img"
    with open(img, "wb") as f:
        f.truncate(size)
    env = dict(os.environ, TGT_IPC_SOCKET=str(wd / "tgtd.socket"))
    port = port or free_port()
    log = open(wd / "tgtd.log", "wb")
    proc = subprocess.Popen([tgtd_bin, "-f", "--iscsi", f"portal=127.0.0.1:{port}"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def adm(*args: str) -> None:
            for _ in range(100):
                r = subprocess.run([tgtadm_bin, "--lld", "iscsi", *args], env=env, capture_output=True)
                if r.returncode == 0:
                    return
                if proc.poll() is not None:
                    raise RuntimeError(f"tgtd exited: {(wd / 'tgtd.log').read_text(errors='replace')[-500:]}")
                time.sleep(0.05)
            raise RuntimeError(f"tgtadm {' '.join(args)}: {r.stderr.decode(errors='replace')}")

        adm("--op", "new", "--mode", "target", "--tid", "1", "-T", TGT_IQN)
        adm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", str(img), "--blocksize=512")
        adm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
        if digests:
            # tgt answers None to a CRC32C offer unless the target allows digests.
            adm("--op", "update", "--mode", "target", "--tid", "1", "--name", "HeaderDigest", "--value", "CRC32C,None")
            adm("--op", "update", "--mode", "target", "--tid", "1", "--name", "DataDigest", "--value", "CRC32C,None")
        _wait_port(port, proc)
        yield Daemon(proc, port, TGT_IQN, TGT_LUN, img)
    finally:
        _stop(proc, grace=1.0)  # tgtd ignores SIGTERM while it has targets: then SIGKILL
        log.close()


@contextlib.contextmanager
def netswap_target(workdir: str | os.PathLike[str], *, size: str = "64M", extra: list[str] | None = None, iqn: str = "iqn.2024-01.org.netswap:disk") -> Iterator[Daemon]:
    """`netswap serve iscsi` in a subprocess on a free port; waits for its ready line."""
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    img = wd / "lun0.img"
    cmd = [sys.executable, "-m", "emu", "serve", "iscsi", "--lun", str(img), "--size", size, "--port", "0", "--iqn", iqn, *(extra or [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(wd / "target.err", "wb"))
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline().decode() if ready else ""
        if " ready on " not in line:
            raise RuntimeError(f"netswap serve iscsi did not start: {line!r} {(wd / 'target.err').read_text(errors='replace')[-800:]}")
        port = int(line.split(" ready on ")[1].split()[0].rsplit(":", 1)[1])
        yield Daemon(proc, port, iqn, 0, img)
    finally:
        _stop(proc)
        if proc.stdout:
            proc.stdout.close()
