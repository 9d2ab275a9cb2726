"""`netswap serve nfs`: serve a directory over MOUNT v3 and NFSv3 on UDP and TCP (loopback only).

Every failure is one line on stderr, `netswap: error: ...`, with exit status 2 for a bad option
and 1 for anything else (a port in use, an export that cannot be opened); no traceback.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import trio

from emu.util.cli import CliError, CliUsageError, OneLineCommand, loopback_bind, size_option, usage
from emu.util.units import SIZE_HELP
from nfs.auth import Squash
from nfs.server import ListenError, NfsServer, ServerConfig, parse_allow



def _cidr(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[Any]:
    try:
        return parse_allow(value)
    except ValueError as e:
        usage(f"--allow: {e}")


def _port(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and not 0 <= value <= 65535:
        usage(f"--{param.name.replace('_', '-') if param.name else 'port'} {value}: must be 0..65535 (0 picks a free port)")
    return value


def _idle(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        usage(f"{param.opts[0]} {value}: must be a number of seconds above 0")
    return value


def check_ports(port: int, mount_port: int, portmap_port: int | None) -> None:
    named = [("--port", port), ("--mount-port", mount_port)]
    if portmap_port is not None:
        named.append(("--portmap-port", portmap_port))
    for i, (a, pa) in enumerate(named):
        for b, pb in named[i + 1:]:
            if pa and pa == pb:
                usage(f"{a} and {b} are both {pa}: each service needs its own port")


@click.command("nfs", cls=OneLineCommand,
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--export", "export", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Directory to export. Clients mount it by its absolute path (or a --name alias).")
@click.option("--bind", default="127.0.0.1", show_default=True, callback=loopback_bind,
              help="Loopback address to listen on (127.0.0.0/8 or ::1).")
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
@click.option("--max-buffered", default="64M", show_default=True, callback=size_option(1, "must be above 0"),
              help=f"Cap on the bytes of calls held over all connections ({SIZE_HELP}).")
@click.option("--idle-timeout", default=360.0, show_default=True, type=float, callback=_idle,
              help="Close a TCP connection idle this many seconds (knfsd: 6 minutes).")
@click.option("--record-timeout", default=5.0, show_default=True, type=float, callback=_idle,
              help="Close a TCP connection whose record body stalls this many seconds.")
@click.option("--max-connections", default=256, show_default=True, type=click.IntRange(1),
              help="TCP connections at once; past it the one idle the longest is closed.")
@click.option("--write-behind", default="4M", show_default=True, callback=size_option(0, "must be 0 (never) or more"),
              help="Start writing a file's dirty pages to disk every this many bytes of UNSTABLE "
                   f"WRITEs, so the COMMIT that follows has little left to wait for; 0: never ({SIZE_HELP}).")
@click.option("--stats", "stats_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="On exit, write per-client calls, bytes and service-time percentiles as JSON to this file.")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def serve_nfs(export: Path, bind: str, port: int, mount_port: int, portmap_port: int | None,
              allow: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network], names: tuple[str, ...],
              state_dir: Path | None, max_record: int, root_squash: bool, anonuid: int, anongid: int,
              max_buffered: int, idle_timeout: float, record_timeout: float, max_connections: int,
              write_behind: int, stats_path: Path | None, verbose: int) -> None:
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
            usage(f"--name {n}: must be an absolute path like /export")
    check_ports(port, mount_port, portmap_port)
    config = ServerConfig(export=export, bind=bind, port=port, mount_port=mount_port, portmap_port=portmap_port,
                          allow=allow, state_dir=state_dir, names=names, max_record=max_record,
                          squash=Squash(root_squash, anonuid, anongid), max_buffered=max_buffered,
                          idle_timeout=idle_timeout, record_timeout=record_timeout,
                          max_connections=max_connections, write_behind=write_behind)
    try:
        server = NfsServer(config)
    except OSError as e:
        raise CliError(f"cannot export {export}: {e.strerror or e}") from None
    except ValueError as e:  # the budget cannot hold the connections' reserves and one record
        usage(f"--max-buffered: {e}")

    failed: list[str] = []

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                try:
                    ports = await nursery.start(server.serve)
                except ListenError as e:
                    failed.append(str(e))
                    return
                pm = ports.get("portmap")
                click.echo(f"netswap nfs ready: export={server.export.root} bind={bind} nfs_port={ports['nfs']} "
                           f"mount_port={ports['mount']} portmap_port={pm if pm is not None else 'off'} "
                           f"verifier={server.verifier.hex()}")
                sys.stdout.flush()
                async for signum in signals:
                    click.echo(f"netswap nfs: {signal.Signals(signum).name}, stopping", err=True)
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
    if failed:
        raise CliError(failed[0])
    if stats_path is not None:
        tmp = stats_path.with_name(stats_path.name + ".tmp")
        tmp.write_text(json.dumps({"clients": server.clients.to_json(), "latency": server.clients.total().summary(),
                                   "calls": server.svc.stats.calls, "drc_hits": server.svc.drc.stats.hits},
                                  indent=1) + "\n")
        tmp.replace(stats_path)
    st, drc, srv = server.svc.stats, server.svc.drc.stats, server.stats
    click.echo(f"netswap nfs: stopped after {st.calls} calls ({srv.tcp_connections} TCP connections, "
               f"{srv.udp_datagrams} UDP datagrams); reply cache hits {drc.hits}, garbage args "
               f"{st.garbage_args}, dropped {st.dropped}, oversized records {srv.oversized_records}, "
               f"stalled records {srv.stalled_records}, system errors {st.system_err}", err=True)


__all__ = ["CliError", "CliUsageError", "serve_nfs"]
