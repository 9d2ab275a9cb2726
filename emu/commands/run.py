"""`netswap run`: one emulated host, one backend, one policy, to a real server."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console

from emu import scenario as scen
from emu.kernel.policy import Policy
from emu.swapdev.endpoint import ServerURLError, backend_for_url, server_for_backend
from emu.util.cli import OneLineCommand, Seconds, size_option
from emu.util.signals import exit_interrupted, is_interrupt, sigterm_as_interrupt
from emu.util.units import format_size

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_STUCK = 0, 1, 2, 3


def _writable_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Checked before the run, so that a run is never lost to a file that cannot be written."""
    if value is None:
        return None
    parent = Path(value).resolve().parent
    if not parent.is_dir():
        raise click.BadParameter(f"{value!r}: {str(parent)!r} is not a directory" if parent.exists()
                                 else f"{value!r}: no such directory {str(parent)!r}", ctx, param)
    if Path(value).is_dir():
        raise click.BadParameter(f"{value!r} is a directory", ctx, param)
    return value


def apply_overrides(sc: scen.Scenario, *, backend: str | None, policy: str | None, ram: int | None,
                    swap: int | None, workload: str | None, traffic: str | None,
                    duration: float | None, server: str | None) -> scen.Scenario:
    """Command-line flags override the scenario file; re-validated so a flag cannot break it."""
    d = scen.loads(scen.dumps(sc), source=sc.source)
    d.source = sc.source
    if backend:
        d.backend = backend
    if policy:
        d.policy = Policy(policy)
    if ram is not None:
        d.host.ram = ram
    if swap is not None:
        d.host.swap = swap
    if workload:
        d.workload.kind = workload
    if traffic:
        d.traffic.profile = traffic
    if duration is not None:
        d.watchdog.timeout = duration
    if server is not None:
        d.server = server
    try:
        return scen.loads(scen.dumps(d), source=f"{sc.source} with command-line overrides")
    except scen.ScenarioError as e:  # (its line would be one of the regenerated text: meaningless)
        raise scen.ScenarioError(e.source, None, e.key, e.value, e.expected) from None


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
               epilog="Shipped scenarios: " + ", ".join(scen.shipped()) + " (netswap run NAME).")
@click.argument("scenario_file", required=False, metavar="[SCENARIO.toml]")
@click.option("--backend", type=click.Choice(scen.BACKENDS), help="Swap storage: a swap file over NFS/UDP or NFS/TCP, or an iSCSI LUN.")
@click.option("--policy", type=click.Choice(scen.POLICIES), help="none (vanilla 2.6.22), v12 (the seed's reserve), pfmemalloc (Linux 3.6).")
@click.option("--ram", callback=size_option(), metavar="SIZE", help="Emulated RAM, e.g. 12M.")
@click.option("--swap", callback=size_option(), metavar="SIZE", help="Swap size, e.g. 64M.")
@click.option("--workload", type=click.Choice(scen.WORKLOADS), help="Access pattern of the workload processes.")
@click.option("--traffic", type=click.Choice(scen.TRAFFIC_PROFILES), help="Background traffic profile.")
@click.option("--duration", type=Seconds(min=0.01), metavar="S", help="Give the run at most S emulated seconds to finish (watchdog.timeout); a run still going then ends with outcome timeout, exit 1.")
@click.option("--wall-timeout", type=Seconds(min=1.0), default=600.0, show_default=True, metavar="S",
              help="Safety net: give up after S seconds of wall-clock time (outcome timeout, exit 1).")
@click.option("--server", metavar="URL", help="Swap to an external server: nfs://127.0.0.1/EXPORT?nfsport=P&mountport=Q or iscsi://127.0.0.1:PORT/IQN/LUN (the backend follows the scheme unless --backend is given). Default: start ours.")
@click.option("--json", "json_out", metavar="OUT", help="Write the result as JSON to OUT ('-' for stdout).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Write the timeline PNG, JSON and report into DIR.")
@click.option("--pcap", "pcap", type=click.Path(dir_okay=False), callback=_writable_file, metavar="FILE",
              help="Write every frame the emulated NIC saw (RX with its fate and drop reason as a packet comment, TX) as pcapng to FILE.")
@click.option("--pcap-snaplen", type=click.IntRange(min=0), default=128, show_default=True, metavar="BYTES",
              help="Keep only the first BYTES of each background frame (0: whole); swap traffic (SOCK_MEMALLOC sockets) stays whole.")
@click.option("--pcap-ring", callback=size_option(4096, "the ring must hold at least 4K"), default="128M", show_default=True, metavar="SIZE",
              help="The capture keeps the last SIZE of frames (a ring; older frames are left out and counted).")
@click.option("--dropwatch", is_flag=True, help="Print drops per reason and per socket each emulated second (as dropwatch -l kas), on stderr.")
@click.option("--proc-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Keep DIR/meminfo, vmstat, slabinfo, reserve_info, nstat and ss up to date (each wall second), for `watch cat DIR/meminfo`.")
@click.option("--list-scenarios", is_flag=True, help="List the shipped scenarios and exit.")
@click.option("--print-scenario", is_flag=True, help="Print the effective scenario as TOML and exit.")
@click.option("--hosts", type=click.IntRange(1, scen.MAX_HOSTS), default=None, metavar="N",
              help="Run N hosts at once, each its own process on 127.0.1.1..N, sharing one server "
                   "([cluster] hosts in a scenario).")
@click.option("-q", "--quiet", is_flag=True, help="No live progress.")
def run(scenario_file: str | None, backend: str | None, policy: str | None, ram: int | None, swap: int | None,
        workload: str | None, traffic: str | None, duration: float | None, wall_timeout: float, server: str | None,
        json_out: str | None, out_dir: str | None, pcap: str | None, pcap_snaplen: int, pcap_ring: int,
        dropwatch: bool, proc_dir: str | None, list_scenarios: bool, print_scenario: bool, hosts: int | None,
        quiet: bool) -> None:
    """Run one emulated host swapping to a real server under one policy.

    Without SCENARIO.toml it runs the demo's scenario (its workload and background traffic), so
    `netswap run --backend nfs-udp --policy none` alone shows the deadlock. A shipped scenario
    can be named without `.toml` (see --list-scenarios). Without --server our own server is
    started as a separate process on free loopback ports and stopped afterwards.

    The host runs in emulated time: every rate and duration is the model's, the same on any
    machine, and the same scenario gives the same verdict every time.

    The result (report and table) goes to stdout, progress and logs to stderr, so
    `netswap run > result.txt` keeps the result; with `--json -` stdout holds only the JSON.

    A server that is killed and restarted mid-run is survived (hard NFS, iSCSI session
    recovery); one that never comes back ends the run as `server_down`, never as a deadlock.

    With --hosts N (or [cluster] hosts = N) N hosts run at once against one server, each its
    own process with its own address 127.0.1.i, swap file or LUN, clock and seed; the result is
    per host and for the cluster (completed, stuck, the server's calls, latency and RSS), with one
    timeline figure, a row per host, in --out.

    Exit status: 0 completed, 3 stuck (deadlock or livelock; the report is printed), 2 usage
    error, 1 other error (a timeout or a server down included), 130/143 interrupted by
    SIGINT/SIGTERM (servers stopped, the partial result written).
    """
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 100)
    json_stdout = json_out == "-"
    result_console = console if json_stdout else Console(width=None if sys.stdout.isatty() else 100)
    if list_scenarios:
        for name in scen.shipped():
            click.echo(f"{name}: {scen.load(name).description}")
        return
    try:
        sc = scen.load(scenario_file) if scenario_file else scen.default()
        if server and backend is None:  # the URL's scheme picks the backend
            backend = backend_for_url(server, sc.backend)
        sc = apply_overrides(sc, backend=backend, policy=policy, ram=ram, swap=swap, workload=workload,
                             traffic=traffic, duration=duration, server=server)
        if hosts is not None:
            sc = scen.set_values(sc, {"cluster.hosts": hosts}, source=f"{sc.source} with --hosts {hosts}")
    except scen.ScenarioError as e:
        usage_fail(str(e))
    if sc.server:
        try:
            server_for_backend(sc.backend, sc.server)
        except ServerURLError as e:
            usage_fail(f"--server: {e}")
    if print_scenario:
        click.echo(scen.dumps(sc), nl=False)
        return

    from emu.host import run_scenario
    from emu.host.observe import Observe
    from emu.host.progress import LiveProgress
    from emu.host.report import print_result
    from emu.host.result import RunInterrupted

    out = Path(out_dir) if out_dir else None
    if hosts is not None or sc.cluster.hosts > 1:  # --hosts 1: one host through the cluster's machinery
        if pcap or dropwatch or proc_dir:
            console.print("[red]error:[/] --pcap, --dropwatch and --proc-dir watch one host; not with a cluster (--hosts)")
            sys.exit(EXIT_USAGE)
        _run_cluster(console, result_console, sc, out, json_out, wall_timeout, quiet)
    observe = None
    if pcap or dropwatch or proc_dir:
        observe = Observe(pcap=Path(pcap) if pcap else None, pcap_snaplen=pcap_snaplen, pcap_ring=pcap_ring,
                          dropwatch=(lambda line: console.print(line, markup=False, highlight=False)) if dropwatch else None,
                          proc_dir=Path(proc_dir) if proc_dir else None)
    check_outputs(json_out, out)  # before the run, not after it: a result is never lost
    announce_traffic_fallback(sc.traffic.profile)
    with sigterm_as_interrupt() as sig:
        try:
            with LiveProgress(console, enabled=not quiet and not (json_out == "-" and not console.is_terminal)) as live:
                live.add_run(sc.backend, sc.policy)
                result = run_scenario(sc, progress=live.update, out_dir=out, wall_timeout=wall_timeout, observe=observe)
        except BaseException as e:
            if not is_interrupt(e):
                if not isinstance(e, Exception):
                    raise
                fail(one_line(e))
            partial = e.results[-1] if isinstance(e, RunInterrupted) and e.results else None
            where = f" at t={partial.emulated_s:.3f} s (emulated)" if partial is not None else ""
            if partial is not None and json_out:
                _write_json(json_out, partial)
            click.echo(f"netswap: interrupted by {sig.name}{where}; servers stopped"
                       + (f", partial result in {json_out}" if partial is not None and json_out and json_out != "-" else ""),
                       err=True)
            exit_interrupted(sig)
    if result.outcome != "error":  # a run that never got going has no table worth reading
        print_result(result_console, result)
    for ev in result.server_events if result.outcome != "error" else ():
        t = f"[{ev['t']:10.3f}] " if ev.get("t") is not None else ""
        console.print(f"{t}{ev['message']}", highlight=False, markup=False)
    if result.pcap:
        p = result.pcap
        console.print(f"pcap: {p['file']}: {p['frames_written']} frames ({p['rx_frames']} RX, {p['tx_frames']} TX"
                      + (f"; the oldest {p['left_out']} left out of the {format_size(p['ring_bytes'])} ring" if p["left_out"] else "")
                      + f"), written in {p['write_s']:.1f} s; try: tshark -r {p['file']} -Y 'frame.comment contains \"DROP\"'"
                      + (f"; the swap traffic: {p['decode_as']} -r {p['file']} -Y 'nfs || mount || iscsi'" if p.get("decode_as") else ""),
                      markup=False, highlight=False, soft_wrap=True)
    if json_out:
        _write_json(json_out, result)
    if result.error:
        click.echo(f"netswap: {'error: ' if result.outcome != 'server_down' else ''}{result.error}", err=True)
    sys.exit(result.exit_status)


def _write_json(json_out: str, result: Any) -> None:
    payload = json.dumps(result.to_json(), indent=2)
    if json_out == "-":
        click.echo(payload)
    else:
        try:
            Path(json_out).write_text(payload + "\n")
        except OSError as e:
            fail(f"cannot write --json {json_out}: {e.strerror or e}")


def announce_traffic_fallback(profile: str) -> None:
    """Without CAP_NET_RAW (checked as a capability, not as uid 0) the background traffic is
    plain UDP from 127.0.0.1: say so on stderr, and how to run instead (the JSON records it)."""
    from emu.traffic.rawsend import have_cap_net_raw

    if profile != "none" and not have_cap_net_raw():
        click.echo("netswap: no CAP_NET_RAW: background traffic falls back to plain UDP from 127.0.0.1 "
                   "(no spoofed sources, no IP fragments); run as root (sudo) for the full traffic", err=True)


def check_outputs(json_out: str | None, out: Path | None) -> None:
    """Output paths are checked (and --out made) before a run starts: exit 2 naming the flag."""
    if json_out and json_out != "-":
        p = Path(json_out)
        parent = p.parent if str(p.parent) else Path(".")
        if p.is_dir():
            usage_fail(f"--json {json_out}: is a directory")
        if not parent.is_dir():
            usage_fail(f"--json {json_out}: {parent} is not a directory" if parent.exists()
                       else f"--json {json_out}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
            usage_fail(f"--json {json_out}: not writable")
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            usage_fail(f"--out {out}: cannot create it: {e.strerror or e}")
        if not os.access(out, os.W_OK):
            usage_fail(f"--out {out}: not writable")


def one_line(e: BaseException) -> str:
    """The reason a run could not start, in one line (the innermost errors of a group)."""
    from emu.host.servers import ServerStartError

    leaves = list(_leaves(e))
    parts = []
    for x in leaves[:3]:
        msg = str(x).strip().splitlines()[0] if str(x).strip() else type(x).__name__
        parts.append(msg if isinstance(x, (ServerStartError, OSError)) else f"{type(x).__name__}: {msg}")
    return "; ".join(parts)


def _leaves(e: BaseException) -> Iterator[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        for x in e.exceptions:
            yield from _leaves(x)
    else:
        yield e


def fail(message: str, status: int = EXIT_ERROR) -> NoReturn:
    click.echo(f"netswap: error: {message}", err=True)
    sys.exit(status)


def usage_fail(message: str) -> NoReturn:
    fail(message, EXIT_USAGE)


def _run_cluster(console: Console, result_console: Console, sc: scen.Scenario, out: Path | None, json_out: str | None,
                 wall_timeout: float, quiet: bool) -> None:
    from emu.host.cluster import run_cluster
    from emu.host.identity import host_addr, host_label
    from emu.host.progress import LiveProgress
    from emu.host.report import cluster_table

    n = sc.cluster.hosts
    try:
        with LiveProgress(console, enabled=not quiet and not (json_out == "-" and not console.is_terminal)) as live:
            for i in range(1, n + 1):
                live.add_run(f"{host_label(i)} {host_addr(i)}", sc.policy)
            res = run_cluster(sc, progress=live.update, out_dir=out, wall_timeout=wall_timeout)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - a cluster that cannot start is exit 1 with its reason
        console.print(f"[red]error:[/] {type(e).__name__}: {e}")
        sys.exit(EXIT_ERROR)
    cluster_table(result_console, res)
    if json_out:
        payload = json.dumps(res.to_json(), indent=2)
        if json_out == "-":
            click.echo(payload)
        else:
            Path(json_out).write_text(payload + "\n")
    for r in res.results:
        if r.error:
            console.print(f"[red]error:[/] {r.error}")
    sys.exit(res.exit_status)
