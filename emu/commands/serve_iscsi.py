"""`netswap serve iscsi`: serve files as the disk LUNs of one iSCSI target, on loopback.

Every failure is one line on stderr, `netswap: error: ...`, with exit status 2 for a bad option
and 1 for anything else (a port in use, a LUN file that cannot be opened); no traceback. The
listening socket is bound before any LUN file is created, so a target that cannot start leaves
nothing behind.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

import click
import trio

from emu.util.cli import CliError, OneLineCommand, Seconds, loopback_bind, size_option, usage
from emu.util.units import SIZE_HELP, format_size
from iscsi.lun import BLOCK_SIZES, DiskLun
from iscsi.target import LOGIN_TIMEOUT, Target

DEFAULT_IQN = "iqn.2024-01.org.netswap:disk"
DEFAULT_SIZE = 64 << 20  # for a LUN file that does not exist yet
_IQN = re.compile(r"^(iqn\.\d{4}-\d{2}\.[^ ]+|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$")
_ERRNO_WORDS = {errno.EADDRINUSE: "address in use", errno.EACCES: "permission denied",
                errno.EADDRNOTAVAIL: "address not available"}


def _chap(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, secret = value.partition(":")
    if not sep or not user or not secret:
        usage(f"--chap {value}: not USER:SECRET")
    return user, secret


def _iqn(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not _IQN.match(value):
        usage(f"--iqn {value}: not an iqn./eui./naa. name (iqn.YYYY-MM.domain:name)")
    return value


def check_size(size: int, block_size: int, path: Path, thin: bool) -> None:
    """Refuse a LUN size nobody meant: no block at all, a partial block, more than the storage."""
    if size == 0:
        usage(f"--size 0: a LUN needs at least one block of {block_size} bytes")
    if size % block_size:
        usage(f"--size {size}: not a multiple of the block size {block_size} "
              f"(try {format_size(size - size % block_size or block_size)})")
    if size // block_size > 1 << 63:
        usage(f"--size {format_size(size)}: more blocks than READ CAPACITY(16) can report")
    if not thin:
        st = os.statvfs(path.parent if path.parent.exists() else Path("."))
        room = st.f_blocks * st.f_frsize
        if size > room:
            usage(f"--size {format_size(size)}: larger than the whole filesystem holding {path} "
                  f"({room / (1 << 30):.1f} GiB); give --thin to serve a sparse LUN larger than its storage")


def describe_listen_error(bind: str, port: int, e: OSError) -> str:
    reason = _ERRNO_WORDS.get(e.errno or 0) or (e.strerror or str(e)).lower()
    return f"cannot listen on {bind}:{port}: {reason}"


@click.command("iscsi", cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--lun", "lun_paths", required=True, multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Backing file of the next LUN (repeatable: LUN 0, 1, ...); created if missing.")
@click.option("--size", callback=size_option(), default=None,
              help=f"Size of each LUN ({SIZE_HELP}); a smaller file is grown, never shrunk. "
                   f"Default: {format_size(DEFAULT_SIZE)} for a new file, else the file's size.")
@click.option("--block-size", type=click.Choice([str(b) for b in BLOCK_SIZES]), default="512", show_default=True,
              help="Logical block size in bytes.")
@click.option("--thin", is_flag=True, help="Thin provisioning: UNMAP and WRITE SAME with UNMAP punch holes in the "
                                           "file; GET LBA STATUS reports them.")
@click.option("--bind", default="127.0.0.1", show_default=True, callback=loopback_bind,
              help="Loopback address to listen on (127.0.0.0/8 or ::1).")
@click.option("--port", type=click.IntRange(0, 65535), default=3260, show_default=True,
              help="TCP port (0 picks a free one; the ready line says which).")
@click.option("--iqn", default=DEFAULT_IQN, show_default=True, callback=_iqn, help="Target name (iqn.YYYY-MM.domain:name).")
@click.option("--allow-initiator", "allow", multiple=True, metavar="IQN",
              help="Only these initiator names may log in (repeatable). Default: any.")
@click.option("--chap", callback=_chap, default=None, metavar="USER:SECRET",
              help="Require one-way CHAP (MD5) with this user and secret.")
@click.option("--nop-interval", type=Seconds(0), default=30.0, show_default=True,
              help="Seconds between target NOP-In pings on a session (0 disables).")
@click.option("--login-timeout", type=Seconds(0.1, 3600), default=LOGIN_TIMEOUT, show_default=True,
              help="Seconds a connection may take to log in before it is closed.")
@click.option("--stats", "stats_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="On exit, write per-client SCSI commands, bytes, initiator names and service-time "
                   "percentiles as JSON to this file.")
@click.option("-v", "--verbose", is_flag=True,
              help="Log logins (initiator, ISID, negotiated keys), rejects, protocol errors and resets to stderr.")
def serve_iscsi(lun_paths: tuple[Path, ...], size: int | None, block_size: str, thin: bool, bind: str, port: int, iqn: str,
                allow: tuple[str, ...], chap: tuple[str, str] | None, nop_interval: float, login_timeout: float,
                stats_path: Path | None, verbose: bool) -> None:
    """Serve files as the disk LUNs 0, 1, ... of one iSCSI (RFC 7143) target until SIGINT or SIGTERM.

    libiscsi's tools, iscsi-test-cu, Linux open-iscsi and netswap's own initiator can log in:
    iscsi://127.0.0.1:3260/IQN/LUN. Prints one ready line on stdout once it listens.
    """
    bs = int(block_size)
    if stats_path is not None:  # found out now, not after hours of serving
        where = stats_path.parent
        if not where.is_dir() or not os.access(where, os.W_OK):
            usage(f"--stats {stats_path}: {where} is not a directory this process can write to")
    if len(set(p.resolve() for p in lun_paths)) != len(lun_paths):
        usage("--lun: the same file is given twice")
    for path in lun_paths:
        want = size if size is not None else (None if path.exists() else DEFAULT_SIZE)
        if want is not None:
            check_size(want, bs, path, thin)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    failed: list[str] = []
    served: list[Target] = []

    async def main() -> None:
        # Signals are caught before the ready line, so a stop right after it is always clean.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            try:
                listeners = await trio.open_tcp_listeners(port, host=bind)
            except OSError as e:
                failed.append(describe_listen_error(bind, port, e))
                return
            luns = open_luns(lun_paths, size, bs, thin, failed)
            if luns is None:
                for listener in listeners:
                    await listener.aclose()
                return
            try:
                target = Target(iqn, luns, allow_initiators=list(allow) or None, chap=chap, nop_interval=nop_interval,
                                login_timeout=login_timeout)
                served.append(target)
                async with trio.open_nursery() as nursery:
                    await nursery.start(target.serve_listeners, listeners)
                    host, real_port = listeners[0].socket.getsockname()[:2]
                    desc = "; ".join(f"LUN {n}: {lun.path}, {lun.nblocks} blocks of {lun.block_size} bytes"
                                     f"{', thin' if lun.thin else ''}" for n, lun in luns.items())
                    print(f"iscsi target {iqn} ready on {host}:{real_port} ({desc})", flush=True)
                    async for signum in signals:
                        print(f"iscsi target: {signal.Signals(signum).name}, stopping", file=sys.stderr, flush=True)
                        nursery.cancel_scope.cancel()
                        break
            finally:
                for lun in luns.values():
                    lun.close()

    trio.run(main)
    if failed:
        raise CliError(failed[0])
    if stats_path is not None and served:
        write_stats(served[0], stats_path)


def write_stats(target: Target, path: Path) -> None:
    """The target's per-client statistics as JSON, written whole (a reader never sees half)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps({**target.clients.to_json(), "target": dict(target.stats)}, indent=1) + "\n")
        tmp.replace(path)
    except OSError as e:
        raise CliError(f"--stats {path}: cannot write it: {e.strerror or e}") from None


def open_luns(paths: tuple[Path, ...], size: int | None, block_size: int, thin: bool,
              failed: list[str]) -> dict[int, DiskLun] | None:
    """Open (or create) every LUN file; on any failure close them, remove the files this call
    created, and say why in `failed`."""
    luns: dict[int, DiskLun] = {}
    created: list[Path] = []
    for n, path in enumerate(paths):
        existed = path.exists()
        try:
            luns[n] = DiskLun(path, block_size=block_size, size=size if size is not None or existed else DEFAULT_SIZE,
                              thin=thin, lun=n)
        except (OSError, ValueError, OverflowError) as e:
            if not existed and path.exists():
                created.append(path)
            reason = e.strerror.lower() if isinstance(e, OSError) and e.strerror else str(e)
            want = size if size is not None or existed else DEFAULT_SIZE
            failed.append(f"--lun {path}: cannot serve it" + (f" as {format_size(want)}" if want else "") + f": {reason}")
            break
        if not existed:
            created.append(path)
    else:
        return luns
    for lun in luns.values():
        lun.close()
    for path in created:
        path.unlink(missing_ok=True)
    return None
