"""Our own servers for a run, started as separate processes on loopback ports they pick.

Servers are real processes (not emulated, not sharing the emulated host's memory). Without
`--server`, `netswap run` starts `netswap serve nfs` or `netswap serve iscsi` in a temporary
directory (on tmpfs when there is one) and stops them afterwards, whatever happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from emu.swapdev.endpoint import Endpoint, IscsiEndpoint, NfsEndpoint, backend_kind
from emu.util.ports import port_open
from emu.util.procs import stop_process
from emu.util.signals import child_env

DEFAULT_IQN = "iqn.2026-01.org.netswap:swap"


class ServerStartError(RuntimeError):
    pass


@dataclass
class ServerProcess:
    server: Endpoint
    proc: subprocess.Popen[bytes]
    workdir: Path
    log: Path
    ports: tuple[int, ...]
    stats_path: Path | None = None  # where the server writes its per-client stats on exit

    def alive(self) -> bool:
        return self.proc.poll() is None

    def peak_rss_kib(self) -> int:
        """The server's peak resident set (VmHWM), while it runs; 0 when it cannot be read."""
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def log_tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self, timeout: float = 5.0) -> None:
        stop_process(self.proc, timeout)


# The servers bind port 0 and name their ports in their ready line: a port chosen here and bound
# there could be taken in between by another run on the same machine.
_NFS_READY = re.compile(rb"netswap nfs ready: .* nfs_port=(\d+) mount_port=(\d+)")
_ISCSI_READY = re.compile(rb"iscsi target \S+ ready on [^:]+:(\d+)")


def spawn_server(kind: str, workdir: Path, swap_bytes: int, luns: int = 1, stats_path: Path | None = None, *,
                 ports: tuple[int, ...] | None = None, state_dir: Path | None = None, extra: Sequence[str] = (),
                 log: Path | None = None) -> ServerProcess:
    """Start `netswap serve nfs|iscsi` in `workdir` (its export or its LUN files there); ready when
    `wait_ready` returns.  `ports`: where to listen ((nfs, mount) or (iscsi,); none: ports it
    picks); `state_dir`: the NFS server's state kept across restarts; `extra`: more options;
    `log`: its output (a fresh file per start: the ready line is looked for there)."""
    py = [sys.executable, "-m", "emu"]
    log = log or workdir / f"{kind}-server.log"
    if kind == "nfs":
        nfsport, mountport = ports or (0, 0)
        export = workdir / "export"
        export.mkdir(exist_ok=True)
        argv = [*py, "serve", "nfs", "--export", str(export), "--bind", "127.0.0.1",
                "--port", str(nfsport), "--mount-port", str(mountport)]
        if state_dir is not None:
            argv += ["--state-dir", str(state_dir)]
        server: Endpoint = NfsEndpoint("127.0.0.1", str(export), nfsport, mountport)
    else:
        (port,) = ports or (0,)
        size_mib = max(1, -(-swap_bytes // (1 << 20)))
        lun_args = [a for i in range(luns) for a in ("--lun", str(workdir / f"lun{i}.img"))]  # one per host
        argv = [*py, "serve", "iscsi", *lun_args, "--size", f"{size_mib}M", "--bind", "127.0.0.1",
                "--port", str(port), "--iqn", DEFAULT_IQN]
        server = IscsiEndpoint("127.0.0.1", port, DEFAULT_IQN, 0)
    if stats_path is not None:
        argv += ["--stats", str(stats_path)]
    argv += extra
    fh = open(log, "wb")
    try:
        # Its own session, so a Ctrl-C at the terminal reaches only us (we stop it in order);
        # PR_SET_PDEATHSIG (emu.util.signals) so that it dies with us even if we are killed.
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=workdir, start_new_session=True, env=child_env())
    finally:
        fh.close()
    return ServerProcess(server, proc, workdir, log, (), stats_path)


def _ready(sp: ServerProcess) -> bool:
    """Whether the server printed its ready line; then `sp.server` and `sp.ports` name its ports."""
    if not sp.alive():
        args = sp.proc.args if isinstance(sp.proc.args, list) else [sp.proc.args]
        raise ServerStartError(f"{' '.join(map(str, args))} exited with status "
                               f"{sp.proc.returncode}:\n{sp.log_tail()}")
    try:
        text = sp.log.read_bytes()
    except OSError:
        return False
    if isinstance(sp.server, NfsEndpoint):
        m = _NFS_READY.search(text)
        if m is None:
            return False
        nfsport, mountport = int(m.group(1)), int(m.group(2))
        sp.server = dataclasses.replace(sp.server, nfsport=nfsport, mountport=mountport)
        sp.ports = (nfsport, mountport)
    else:
        m = _ISCSI_READY.search(text)
        if m is None:
            return False
        sp.server = dataclasses.replace(sp.server, port=int(m.group(1)))
        sp.ports = (int(m.group(1)),)
    return all(port_open(p) for p in sp.ports)


def wait_ready(sp: ServerProcess, timeout: float = 30.0) -> None:
    """Until the server is ready (`sp.server` then names its ports); ServerStartError if it exits
    or is not ready within `timeout` wall seconds."""
    deadline = time.monotonic() + timeout
    while not _ready(sp):
        if time.monotonic() > deadline:
            raise ServerStartError(f"server not ready after {timeout:.0f} s:\n{sp.log_tail()}")
        time.sleep(0.05)


SERVER_DIR_PREFIX = "netswap-srv-"  # + the owning process's pid + "-": see reap_stale_server_dirs


def reap_stale_server_dirs(base: str | Path) -> list[Path]:
    """Remove the server directories in `base` whose owning process is gone (a run killed by
    SIGKILL, a sweep worker killed mid-run): on tmpfs their swap files hold RAM until reboot.
    A directory whose owner still runs (or whose pid was reused) is left alone."""
    gone = []
    for d in Path(base).glob(f"{SERVER_DIR_PREFIX}*-*"):
        pid = d.name[len(SERVER_DIR_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(d, ignore_errors=True)
        gone.append(d)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's
    return True


@contextlib.contextmanager
def local_server(backend: str, swap_bytes: int, workdir: str | Path | None = None,
                 timeout: float = 30.0, *, luns: int = 1, stats_path: Path | None = None) -> Iterator[ServerProcess]:
    """Start our server for `backend` as a separate process; stop it on exit (even on error).
    `luns`: iSCSI LUNs of `swap_bytes` each (one per host of a cluster); `stats_path`: the
    server's per-client statistics, written there when it stops."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            # tmpfs when there is one: the swap file's FILE_SYNC/FUA fsyncs cost microseconds there,
            # so the runs measure the emulated host, not the disk.
            base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            reap_stale_server_dirs(base or tempfile.gettempdir())
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{SERVER_DIR_PREFIX}{os.getpid()}-",
                                                                      dir=base))
        wd = Path(workdir)
        wd.mkdir(parents=True, exist_ok=True)
        sp = spawn_server(backend_kind(backend), wd, swap_bytes, luns, stats_path)
        try:
            wait_ready(sp, timeout)
            yield sp
        finally:
            sp.stop()
