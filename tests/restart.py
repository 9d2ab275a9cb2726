"""Our servers as real processes that a test can `kill -9` and start again on the same ports and
storage, as an administrator restarting a crashed server would (tests of server restarts)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from emu.swapdev.endpoint import Endpoint, IscsiEndpoint, NfsEndpoint

IQN = "iqn.2026-01.org.netswap:restart"
_READY = {"nfs": re.compile(rb"nfs_port=(\d+) mount_port=(\d+)"), "iscsi": re.compile(rb"ready on [^:]+:(\d+)")}


class RestartableServer:
    """`netswap serve nfs|iscsi` in `workdir`; the first start picks free ports, restarts reuse them."""

    def __init__(self, kind: str, workdir: Path, size: str = "16M") -> None:
        self.kind = kind
        self.workdir = workdir
        self.size = size
        self.ports: tuple[int, ...] = (0, 0) if kind == "nfs" else (0,)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.killed_at: float | None = None  # wall clock (time.monotonic)
        self.restarted_at: float | None = None
        self.restart_error = ""
        (workdir / "export").mkdir(exist_ok=True)

    def argv(self) -> list[str]:
        py = [sys.executable, "-m", "emu", "serve"]
        if self.kind == "nfs":
            return [*py, "nfs", "--export", str(self.workdir / "export"), "--state-dir", str(self.workdir / "state"),
                    "--port", str(self.ports[0]), "--mount-port", str(self.ports[1])]
        return [*py, "iscsi", "--lun", str(self.workdir / "lun0.img"), "--size", self.size, "--port", str(self.ports[0]),
                "--iqn", IQN]

    def start(self, timeout: float = 30.0) -> None:
        log = self.workdir / f"server-{self.starts}.log"
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(self.argv(), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            m = _READY[self.kind].search(log.read_bytes())
            if m is not None:
                self.ports = tuple(int(g) for g in m.groups())
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {log.read_text(errors='replace')}")
            time.sleep(0.02)

    @property
    def endpoint(self) -> Endpoint:
        if self.kind == "nfs":
            return NfsEndpoint("127.0.0.1", str(self.workdir / "export"), self.ports[0], self.ports[1])
        return IscsiEndpoint("127.0.0.1", self.ports[0], IQN, 0)

    def kill9(self) -> None:
        """A real `kill -9` of the server process."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.killed_at = time.monotonic()

    def hang_for(self, seconds: float) -> threading.Thread:
        """A hung server: SIGSTOP now (it answers nothing, and nothing refuses or resets),
        SIGCONT `seconds` later from a thread (the run goes on)."""
        assert self.proc is not None
        pid = self.proc.pid
        os.kill(pid, signal.SIGSTOP)
        self.killed_at = time.monotonic()

        def later() -> None:
            time.sleep(seconds)
            os.kill(pid, signal.SIGCONT)
            self.restarted_at = time.monotonic()

        t = threading.Thread(target=later, daemon=True)
        t.start()
        return t

    def restart_later(self, delay: float) -> threading.Thread:
        """Start the server again `delay` wall seconds from now, in a thread (the run goes on)."""
        def later() -> None:
            time.sleep(delay)
            try:
                self.start()
                self.restarted_at = time.monotonic()
            except Exception as e:  # the test asserts on it
                self.restart_error = str(e)

        t = threading.Thread(target=later, daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
