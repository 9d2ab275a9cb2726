"""Real NFS peers on loopback, for interop tests and `netswap bench nfs`: netswap's own server
as a subprocess (`netswap serve nfs`), nfs-ganesha (with rpcbind), dumpcap, and libnfs's tools.
Every process and mount started here is stopped or undone on exit, also when the body fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from emu.util.ports import free_port, port_open
from emu.util.procs import stop_process

H = "127.0.0.1"


class TestbedError(RuntimeError):
    """A real peer could not be set up (a daemon missing, not starting, not answering)."""


def fs_type(path: Path) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=False)
    return out.stdout.strip()


@dataclass
class Served:
    nfs_port: int
    mount_port: int
    export: Path  # on disk
    export_path: str  # what clients mount
    proc: subprocess.Popen

    def url(self, rel: str = "") -> str:
        path = self.export_path.rstrip("/") + ("/" + rel.lstrip("/") if rel else "")
        return f"nfs://{H}{path}?version=3&nfsport={self.nfs_port}&mountport={self.mount_port}"


@contextlib.contextmanager
def netswap_server(export: Path, state_dir: Path, extra: tuple[str, ...] = ()) -> Iterator[Served]:
    """`netswap serve nfs --export ...` on free ports; yields once its ready line is printed."""
    proc = subprocess.Popen([sys.executable, "-m", "emu", "serve", "nfs", "--export", str(export), "--port", "0", "--mount-port",
                             "0", "--state-dir", str(state_dir), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        m = re.search(r"export=(\S+) .*nfs_port=(\d+) mount_port=(\d+)", line)
        if not m:
            err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
            raise TestbedError(f"netswap nfs server did not start: {line!r} {err}")
        yield Served(int(m.group(2)), int(m.group(3)), export, m.group(1), proc)
    finally:
        stop_process(proc)


@contextlib.contextmanager
def rpcbind() -> Iterator[subprocess.Popen | None]:
    """rpcbind on port 111: reuse a running one, else start ours (and stop it afterwards)."""
    if port_open(111):
        yield None
        return
    proc = subprocess.Popen(["rpcbind", "-f"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not port_open(111):
            if proc.poll() is not None or time.monotonic() > deadline:
                if port_open(111):
                    break  # another rpcbind won the race for port 111: use that one
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise TestbedError(f"rpcbind did not start: {err}")
            time.sleep(0.05)
        yield proc if proc.poll() is None else None
    finally:
        stop_process(proc)


GANESHA_CONF = """\
NFS_CORE_PARAM {{ Protocols = 3; NFS_Port = {nfs}; MNT_Port = {mnt}; Bind_addr = 127.0.0.1;
  Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = true; }}
NFSV4 {{ RecoveryRoot = {dir}/recov; Graceless = true; }}
EXPORT {{ Export_Id = 1; Path = {export}; Pseudo = /export; Protocols = 3; Transports = TCP, UDP;
  Access_Type = RW; Squash = No_Root_Squash; SecType = sys; FSAL {{ Name = VFS; }} }}
"""


OVERLAY_TYPES = ("overlayfs", "overlay", "aufs")


@contextlib.contextmanager
def real_fs_dir(path: Path, size: str) -> Iterator[Path]:
    """A directory on a real filesystem for an export: `path` itself unless it is on overlayfs
    (ganesha's VFS FSAL cannot export that; containers often have it), else a directory in
    /dev/shm if that is a tmpfs, else a tmpfs of `size` mounted at `path` (unmounted after)."""
    path.mkdir(parents=True, exist_ok=True)
    if fs_type(path) not in OVERLAY_TYPES:
        yield path
        return
    shm = Path("/dev/shm")
    if shm.is_dir() and fs_type(shm) == "tmpfs" and os.access(shm, os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="netswap-export-", dir=shm))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def ganesha(workdir: Path, tmpfs_size: str = "1g", timeout: float = 30.0) -> Iterator[Served]:
    """nfs-ganesha (VFS FSAL, NFSv3 over UDP and TCP) exporting workdir/export, with rpcbind."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "recov").mkdir(exist_ok=True)
    export = workdir / "export"
    with rpcbind(), real_fs_dir(export, tmpfs_size) as export:
        proc = None
        for attempt in range(3):
            # (free ports, bound by ganesha a moment later: another process may take one first;
            # then ganesha fails to bind, and starts again on other ports)
            nfs = free_port(H, udp_too=True)
            mnt = free_port(H, udp_too=True, avoid={nfs})
            proc = _start_ganesha(workdir, export, nfs, mnt, timeout, may_retry=attempt < 2)
            if proc is not None:
                break
        assert proc is not None  # (the last try raises rather than give up)
        try:
            yield Served(nfs, mnt, export, str(export), proc)
        finally:
            stop_process(proc, grace=15)


def _start_ganesha(workdir: Path, export: Path, nfs: int, mnt: int, timeout: float,
                   may_retry: bool) -> subprocess.Popen[bytes] | None:
    """ganesha.nfsd on these ports, once both are open; None (stopped) if it could not bind
    one and `may_retry`; TestbedError if it did not start."""
    conf, log = workdir / "ganesha.conf", workdir / "ganesha.log"
    conf.write_text(GANESHA_CONF.format(nfs=nfs, mnt=mnt, dir=workdir, export=export))
    log.unlink(missing_ok=True)
    proc = subprocess.Popen(["ganesha.nfsd", "-F", "-f", str(conf), "-L", str(log), "-N", "NIV_EVENT",
                             "-p", str(workdir / "ganesha.pid")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not (port_open(nfs) and port_open(mnt)):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                if not (may_retry and "Address already in use" in tail):
                    raise TestbedError(f"ganesha did not start (rc={proc.poll()}):\n{tail}")
                stop_process(proc, grace=15)
                return None
            time.sleep(0.1)
    except BaseException:
        stop_process(proc, grace=15)
        raise
    return proc


@contextlib.contextmanager
def capture(port_filter: str, out: Path, iface: str = "lo") -> Iterator[Path]:
    """dumpcap on loopback with a BPF filter; yields once packets are really being captured
    (dumpcap says "Capturing on" a moment before it does: we send probe datagrams until one
    lands in the file), and is stopped (SIGINT) and flushed when the block ends."""
    probe_port = free_port(H, udp_too=True)
    flt = f"({port_filter}) or (udp port {probe_port})"
    log = out.with_suffix(".dumpcap.log")  # a file, not a pipe: its progress output never blocks it
    with open(log, "w") as err:
        proc = subprocess.Popen(["dumpcap", "-i", iface, "-B", "256", "-f", flt, "-w", str(out)],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 15
        while "Capturing on" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise TestbedError(f"dumpcap did not start: {log.read_text(errors='replace')}")
            time.sleep(0.02)
        if not _probe_until_captured(out, probe_port, lambda: proc.poll() is None and time.monotonic() < deadline):
            raise TestbedError("dumpcap captures nothing")
        yield out
        _probe_until_captured(out, probe_port)  # (the packets before it are in the file too)
    finally:
        stop_process(proc, grace=10, sig=signal.SIGINT)  # dumpcap writes out what it holds on SIGINT


def _probe_until_captured(out: Path, port: int, go_on: Callable[[], bool] | None = None) -> bool:
    """Send probe datagrams to `port` until the capture file grows (dumpcap writes each packet
    as it comes, in order): whether it did, within 10 s (or while `go_on()`)."""
    give_up = time.monotonic() + 10
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        size0 = out.stat().st_size if out.exists() else 0
        while not (out.exists() and out.stat().st_size > size0):
            if (go_on is not None and not go_on()) or time.monotonic() > give_up:
                return False
            probe.sendto(b"netswap capture probe", (H, port))
            time.sleep(0.05)
        return True
    finally:
        probe.close()


def libnfs(tool: str, *args: str, timeout: float = 120.0, stdout: int = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    """One of libnfs's tools, its output captured (`stdout=subprocess.DEVNULL`: only stderr)."""
    return subprocess.run([tool, *args], stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout,
                          env={**os.environ, "LC_ALL": "C"})
