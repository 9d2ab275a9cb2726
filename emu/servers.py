"""The servers a run swaps to: ours, started as separate processes, or external ones by URL.

Servers are real processes (not emulated, not sharing the emulated host's memory). Without
`--server`, `netswap run` starts `netswap serve nfs` or `netswap serve iscsi` on free loopback
ports in a temporary directory and stops them afterwards, whatever happens. With `--server` it
swaps to the server a URL names, spelled the way libnfs and libiscsi spell them:

    nfs://127.0.0.1/export?nfsport=P&mountport=Q[&swapfile=NAME]
    iscsi://127.0.0.1:3261/iqn.2024-01.test:tgt/1

Only loopback addresses are accepted: netswap never sends anything off this machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_IQN = "iqn.2026-01.org.netswap:swap"
SWAPFILE = "netswap.swap"


class ServerURLError(ValueError):
    pass


class ServerStartError(RuntimeError):
    pass


@dataclass(frozen=True)
class NfsServer:
    host: str
    export: str
    nfsport: int
    mountport: int
    swapfile: str = SWAPFILE

    def url(self) -> str:
        return f"nfs://{self.host}{self.export}?nfsport={self.nfsport}&mountport={self.mountport}"


@dataclass(frozen=True)
class IscsiServer:
    host: str
    port: int
    iqn: str
    lun: int

    def url(self) -> str:
        return f"iscsi://{self.host}:{self.port}/{self.iqn}/{self.lun}"


Server = NfsServer | IscsiServer


def _loopback(host: str, url: str) -> str:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ServerURLError(f"{url}: host {host!r} must be an IPv4 address in 127.0.0.0/8") from None
    if not addr.is_loopback or addr.version != 4:
        raise ServerURLError(f"{url}: host {host} is not in 127.0.0.0/8 (netswap stays on loopback)")
    return host


def _port(value: str, name: str, url: str) -> int:
    try:
        p = int(value)
    except ValueError:
        raise ServerURLError(f"{url}: {name}={value!r} is not a port number") from None
    if not 0 < p < 65536:
        raise ServerURLError(f"{url}: {name}={p} is not a port number (1-65535)")
    return p


def parse_server_url(url: str) -> Server:
    """Parse an nfs:// or iscsi:// URL as libnfs / libiscsi do (explicit ports for NFS)."""
    parts = urlsplit(url)
    if parts.scheme == "nfs":
        if parts.port is not None:
            raise ServerURLError(f"{url}: libnfs does not take host:port; give ?nfsport=P&mountport=Q")
        host = _loopback(parts.hostname or "", url)
        export = unquote(parts.path) or ""
        if not export.startswith("/") or export == "/":
            raise ServerURLError(f"{url}: the path must name the export, e.g. nfs://127.0.0.1/export")
        q = parse_qs(parts.query, keep_blank_values=True)
        unknown = set(q) - {"nfsport", "mountport", "version", "swapfile"}
        if unknown:
            raise ServerURLError(f"{url}: unknown option(s) {', '.join(sorted(unknown))}")
        if q.get("version", ["3"])[0] != "3":
            raise ServerURLError(f"{url}: only NFS version=3 is supported")
        if "nfsport" not in q or "mountport" not in q:
            raise ServerURLError(f"{url}: give both ?nfsport=P&mountport=Q (netswap does not ask portmap)")
        swapfile = q.get("swapfile", [SWAPFILE])[0]
        if not swapfile or "/" in swapfile or swapfile in (".", ".."):
            raise ServerURLError(f"{url}: swapfile={swapfile!r} must be a plain file name")
        return NfsServer(host, export.rstrip("/"), _port(q["nfsport"][0], "nfsport", url),
                         _port(q["mountport"][0], "mountport", url), swapfile)
    if parts.scheme == "iscsi":
        host = _loopback(parts.hostname or "", url)
        try:
            port = parts.port or 3260
        except ValueError:
            raise ServerURLError(f"{url}: bad port") from None
        bits = [b for b in parts.path.split("/") if b]
        if len(bits) != 2:
            raise ServerURLError(f"{url}: expected iscsi://127.0.0.1[:port]/<target-iqn>/<lun>")
        iqn, lun_s = bits
        if not (iqn.startswith("iqn.") or iqn.startswith("eui.") or iqn.startswith("naa.")):
            raise ServerURLError(f"{url}: {iqn!r} is not an iSCSI name (iqn., eui. or naa.)")
        try:
            lun = int(lun_s)
        except ValueError:
            raise ServerURLError(f"{url}: LUN {lun_s!r} is not a number") from None
        if not 0 <= lun < 16384:
            raise ServerURLError(f"{url}: LUN {lun} out of range")
        return IscsiServer(host, port, iqn, lun)
    raise ServerURLError(f"{url}: expected an nfs:// or iscsi:// URL")


def backend_kind(backend: str) -> str:
    return "iscsi" if backend == "iscsi" else "nfs"


def check_backend_matches(backend: str, server: Server) -> None:
    if backend_kind(backend) == "nfs" and not isinstance(server, NfsServer):
        raise ServerURLError(f"backend {backend} needs an nfs:// server, got {server.url()}")
    if backend == "iscsi" and not isinstance(server, IscsiServer):
        raise ServerURLError(f"backend iscsi needs an iscsi:// server, got {server.url()}")


# --- our servers as processes -----------------------------------------------------------------


def free_port(host: str = "127.0.0.1", udp_too: bool = False) -> int:
    """A port free for TCP (and UDP when asked) on `host`: bind port 0 and let the kernel choose."""
    for _ in range(50):
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            t.bind((host, 0))
            port = t.getsockname()[1]
            if not udp_too:
                return port
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                u.bind((host, port))
                return port
            except OSError:
                continue
            finally:
                u.close()
        finally:
            t.close()
    raise ServerStartError("no free loopback port found")


def _tcp_ready(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


@dataclass
class ServerProcess:
    server: Server
    proc: subprocess.Popen[bytes]
    workdir: Path
    log: Path
    ports: tuple[int, ...]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)


def _spawn(kind: str, workdir: Path, swap_bytes: int) -> ServerProcess:
    py = [sys.executable, "-m", "emu"]
    log = workdir / f"{kind}-server.log"
    if kind == "nfs":
        export = workdir / "export"
        export.mkdir(exist_ok=True)
        nfsport = free_port(udp_too=True)
        mountport = free_port(udp_too=True)
        while mountport == nfsport:
            mountport = free_port(udp_too=True)
        argv = [*py, "serve", "nfs", "--export", str(export), "--bind", "127.0.0.1",
                "--port", str(nfsport), "--mount-port", str(mountport)]
        server: Server = NfsServer("127.0.0.1", str(export), nfsport, mountport)
        ports: tuple[int, ...] = (nfsport, mountport)
    else:
        port = free_port()
        lun = workdir / "lun0.img"
        size_mib = max(1, -(-swap_bytes // (1 << 20)))
        argv = [*py, "serve", "iscsi", "--lun", str(lun), "--size", f"{size_mib}M", "--bind", "127.0.0.1",
                "--port", str(port), "--iqn", DEFAULT_IQN]
        server = IscsiServer("127.0.0.1", port, DEFAULT_IQN, 0)
        ports = (port,)
    fh = open(log, "wb")
    try:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=workdir, start_new_session=True)
    finally:
        fh.close()
    return ServerProcess(server, proc, workdir, log, ports)


def _ready(sp: ServerProcess) -> bool:
    if not sp.alive():
        raise ServerStartError(f"{' '.join(map(str, sp.proc.args))} exited with status "
                               f"{sp.proc.returncode}:\n{sp.log_tail()}")
    return all(_tcp_ready("127.0.0.1", p) for p in sp.ports)


@contextlib.contextmanager
def local_server(backend: str, swap_bytes: int, workdir: str | Path | None = None,
                 timeout: float = 30.0) -> Iterator[ServerProcess]:
    """Start our server for `backend` as a separate process; stop it on exit (even on error)."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            # tmpfs when there is one: the swap file's FILE_SYNC/FUA fsyncs cost microseconds there,
            # so the runs measure the emulated host, not the disk.
            base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="netswap-srv-", dir=base))
        wd = Path(workdir)
        wd.mkdir(parents=True, exist_ok=True)
        sp = _spawn(backend_kind(backend), wd, swap_bytes)
        try:
            deadline = time.monotonic() + timeout
            while not _ready(sp):
                if time.monotonic() > deadline:
                    raise ServerStartError(f"server not ready after {timeout:.0f} s:\n{sp.log_tail()}")
                time.sleep(0.05)
            yield sp
        finally:
            sp.stop()


def describe(server: Server) -> str:
    return server.url()
