"""`netswap serve iscsi`: serve a file as an iSCSI disk LUN."""

from __future__ import annotations

import re
import signal
import sys

import click
import trio

DEFAULT_IQN = "iqn.2024-01.org.netswap:disk"
_SIZE = re.compile(r"^(\d+)([KMGT]?)(i?B?)?$", re.I)


def parse_size(text: str) -> int:
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size like 64M, 1G or 4096")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]


class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


class ChapType(click.ParamType):
    name = "USER:SECRET"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value  # type: ignore[return-value]
        user, sep, secret = str(value).partition(":")
        if not sep or not user or not secret:
            self.fail(f"{value!r} is not USER:SECRET", param, ctx)
        return user, secret


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--lun", "lun_path", required=True, type=click.Path(dir_okay=False), help="Backing file for LUN 0 (created if missing).")
@click.option("--size", type=SizeType(), default=None, help="Grow/create the file to this size (64M, 1G, ...). Default: 64M for a new file, else its size.")
@click.option("--block-size", type=click.Choice(["512", "1024", "2048", "4096"]), default="512", show_default=True, help="Logical block size in bytes.")
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=3260, show_default=True, help="TCP port (0 picks a free one; the ready line says which).")
@click.option("--iqn", default=DEFAULT_IQN, show_default=True, help="Target name (iqn.YYYY-MM.domain:name).")
@click.option("--allow-initiator", "allow", multiple=True, metavar="IQN", help="Only these initiator names may log in (repeatable). Default: any.")
@click.option("--chap", type=ChapType(), default=None, help="Require one-way CHAP (MD5) with this user and secret.")
@click.option("--nop-interval", type=click.FloatRange(0), default=30.0, show_default=True, help="Seconds between target NOP-In pings on a session (0 disables).")
@click.option("-v", "--verbose", is_flag=True, help="Log logins and protocol errors to stderr.")
def serve_iscsi(lun_path: str, size: int | None, block_size: str, bind: str, port: int, iqn: str, allow: tuple[str, ...], chap: tuple[str, str] | None, nop_interval: float, verbose: bool) -> None:
    """Serve a file as an iSCSI (RFC 7143) disk LUN 0 until SIGINT or SIGTERM.

    libiscsi's tools, iscsi-test-cu, Linux open-iscsi and netswap's own initiator can log in:
    iscsi://127.0.0.1:3260/IQN/0. Prints one ready line on stdout once it listens.
    """
    import logging
    import os

    from .lun import DiskLun
    from .target import Target

    if not re.match(r"^(iqn\.\d{4}-\d{2}\.[^ ]+|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$", iqn):
        raise click.BadParameter(f"{iqn!r} is not an iqn./eui./naa. name", param_hint="'--iqn'")
    if verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if size is None and not os.path.exists(lun_path):
        size = 64 << 20
    try:
        lun = DiskLun(lun_path, block_size=int(block_size), size=size)
    except (OSError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="'--lun'") from None
    target = Target(iqn, {0: lun}, allow_initiators=list(allow) or None, chap=chap, nop_interval=nop_interval)

    async def main() -> None:
        # Signals are caught before the ready line, so a stop right after it is always clean.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                try:
                    listeners = await nursery.start(target.serve, bind, port)
                except OSError as e:
                    raise click.ClickException(f"cannot listen on {bind}:{port}: {e.strerror or e}") from None
                host, real_port = listeners[0].socket.getsockname()[:2]
                print(
                    f"iscsi target {iqn} ready on {host}:{real_port} "
                    f"(LUN 0: {lun_path}, {lun.nblocks} blocks of {lun.block_size} bytes)",
                    flush=True,
                )
                async for signum in signals:
                    print(f"iscsi target: {signal.Signals(signum).name}, stopping", file=sys.stderr, flush=True)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    finally:
        lun.close()
