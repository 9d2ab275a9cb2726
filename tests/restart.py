"""Our servers as real processes that a test can `kill -9` and start again on the same ports and
storage, as an administrator restarting a crashed server would (tests of server restarts)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from emu.host.servers import ServerProcess, spawn_server, wait_ready
from emu.swapdev.endpoint import Endpoint
from emu.util.procs import stop_process
from emu.util.units import parse_size


class RestartableServer:
    """`netswap serve nfs|iscsi` in `workdir`; the first start picks free ports, restarts reuse them
    (and the NFS server's state directory)."""

    def __init__(self, kind: str, workdir: Path, size: str = "16M") -> None:
        self.kind = kind
        self.workdir = workdir
        self.swap_bytes = parse_size(size)
        self.ports: tuple[int, ...] | None = None  # None: the first start picks them
        self.sp: ServerProcess | None = None
        self.starts = 0
        self.killed_at: float | None = None  # wall clock (time.monotonic)
        self.restarted_at: float | None = None
        self.restart_error = ""

    def start(self, timeout: float = 30.0) -> None:
        self.sp = spawn_server(self.kind, self.workdir, self.swap_bytes, ports=self.ports,
                               state_dir=self.workdir / "state" if self.kind == "nfs" else None,
                               log=self.workdir / f"server-{self.starts}.log")
        self.starts += 1
        wait_ready(self.sp, timeout)
        self.ports = self.sp.ports

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.sp.proc if self.sp is not None else None

    @property
    def endpoint(self) -> Endpoint:
        assert self.sp is not None, "not started"
        return self.sp.server

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
        if self.proc is not None:
            stop_process(self.proc)
