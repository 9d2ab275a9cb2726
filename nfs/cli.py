"""`netswap serve nfs`: serve a directory over MOUNT v3 and NFSv3 on UDP and TCP."""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
from pathlib import Path

import click
import trio

from nfs.auth import Squash
from nfs.server import NfsServer, ServerConfig, parse_allow


def _cidr(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list:
    try:
        return parse_allow(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


def _size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    value = int(float(num) * units[unit])
    if value <= 0:
        raise ValueError("must be positive")
    return value


def _port(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and not 0 <= value <= 65535:
        raise click.BadParameter("must be 0..65535 (0 picks a free port)", ctx=ctx, param=param)
    return value


@click.command("nfs", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--export", "export", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Directory to export. Clients mount it by its absolute path (or a --name alias).")
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=2049, show_default=True, type=int, callback=_port,
              help="NFS port (UDP and TCP); 0 picks a free one.")
@click.option("--mount-port", default=20048, show_default=True, type=int, callback=_port,
              help="MOUNT port (UDP and TCP); 0 picks a free one.")
@click.option("--portmap-port", default=None, type=int, callback=_port,
              help="Also serve portmap v2 on this port (111 is rpcbind's); off by default.")
@click.option("--allow", multiple=True, default=("127.0.0.0/8",), show_default=True, callback=_cidr,
              help="Client network allowed to mount and use the export (repeatable, CIDR).")
@click.option("--name", "names", multiple=True, help="Extra export path clients may mount (repeatable).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the file-handle key is kept [default: ~/.local/state/netswap/nfs].")
@click.option("--max-record", default=4 * 1024 * 1024 + 65536, show_default=True, type=click.IntRange(8192),
              help="Largest TCP record accepted; a bigger one closes that connection.")
@click.option("--root-squash/--no-root-squash", default=False, show_default=True,
              help="Map uid 0 (and gid 0) of AUTH_SYS callers to --anonuid/--anongid (knfsd's root_squash).")
@click.option("--anonuid", default=65534, show_default=True, type=click.IntRange(0, 0xFFFF_FFFF),
              help="uid of AUTH_NONE callers and of squashed root.")
@click.option("--anongid", default=65534, show_default=True, type=click.IntRange(0, 0xFFFF_FFFF),
              help="gid of AUTH_NONE callers and of squashed root.")
@click.option("--max-buffered", default="64M", show_default=True,
              help="Cap on the bytes of calls held over all connections (suffix K/M/G).")
@click.option("--idle-timeout", default=360.0, show_default=True, type=click.FloatRange(0.1),
              help="Close a TCP connection idle this many seconds (knfsd: 6 minutes).")
@click.option("--max-connections", default=256, show_default=True, type=click.IntRange(1),
              help="TCP connections at once; past it the one idle the longest is closed.")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def serve_nfs(export: Path, bind: str, port: int, mount_port: int, portmap_port: int | None,
              allow: list[ipaddress.IPv4Network | ipaddress.IPv6Network], names: tuple[str, ...],
              state_dir: Path | None, max_record: int, root_squash: bool, anonuid: int, anongid: int,
              max_buffered: str, idle_timeout: float, max_connections: int, verbose: int) -> None:
    """Serve a directory (--export) over MOUNT v3 and NFSv3, on UDP and TCP.

    Prints one ready line naming its ports, then serves until SIGINT or SIGTERM. File handles
    survive restarts (their key is in --state-dir); the write verifier changes at every start.

    \b
    Try it with libnfs:
      nfs-ls  'nfs://127.0.0.1/<export>?version=3&nfsport=P&mountport=Q'
      nfs-cp  file 'nfs://127.0.0.1/<export>/file?version=3&nfsport=P&mountport=Q'
    """
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for n in names:
        if not n.startswith("/"):
            raise click.BadParameter("must be an absolute path like /export", param_hint="--name")
    try:
        budget = _size(max_buffered)
    except ValueError as e:
        raise click.BadParameter(f"{max_buffered!r}: {e}", param_hint="--max-buffered") from None
    config = ServerConfig(export=export, bind=bind, port=port, mount_port=mount_port, portmap_port=portmap_port,
                          allow=allow, state_dir=state_dir, names=names, max_record=max_record,
                          squash=Squash(root_squash, anonuid, anongid), max_buffered=budget,
                          idle_timeout=idle_timeout, max_connections=max_connections)
    try:
        server = NfsServer(config)
    except OSError as e:
        raise click.ClickException(f"cannot export {export}: {e}") from None
    except ValueError as e:  # the budget cannot hold the connections' reserves and one record
        raise click.BadParameter(str(e), param_hint="--max-buffered") from None

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                ports = await nursery.start(server.serve)
                pm = ports.get("portmap")
                click.echo(f"netswap nfs ready: export={server.export.root} bind={bind} nfs_port={ports['nfs']} "
                           f"mount_port={ports['mount']} portmap_port={pm if pm is not None else 'off'} "
                           f"verifier={server.verifier.hex()}")
                sys.stdout.flush()
                async for signum in signals:
                    click.echo(f"netswap nfs: {signal.Signals(signum).name}, stopping", err=True)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except OSError as e:
        raise click.ClickException(f"cannot serve: {e}") from None
    st, drc, srv = server.svc.stats, server.svc.drc.stats, server.stats
    click.echo(f"netswap nfs: stopped after {st.calls} calls ({srv.tcp_connections} TCP connections, "
               f"{srv.udp_datagrams} UDP datagrams); reply cache hits {drc.hits}, garbage args "
               f"{st.garbage_args}, dropped {st.dropped}, oversized records {srv.oversized_records}, "
               f"system errors {st.system_err}", err=True)
