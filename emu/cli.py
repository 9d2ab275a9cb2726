"""The `netswap` command line.

Subcommands are loaded lazily from the module that owns them, so `netswap --help` is quick and a
command's heavy imports (scapy, matplotlib) are paid only when it runs.

Exit status: 0 success, 1 other error, 2 usage error, 3 deadlock (`netswap run`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import click

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DEADLOCK = 3


@dataclass(frozen=True)
class LazyCommand:
    target: str  # "package.module:attribute"
    short_help: str


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when used."""

    def __init__(self, *args: object, lazy: dict[str, LazyCommand] | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            spec = self.lazy[cmd_name]
            module_name, _, attr = spec.target.partition(":")
            module = importlib.import_module(module_name)
            command = getattr(module, attr)
            if not isinstance(command, click.Command):
                raise TypeError(f"{spec.target} is not a click command")
            return command
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Use the short help recorded here rather than importing every command to print --help.
        rows = []
        for name in self.list_commands(ctx):
            if name in self.lazy:
                rows.append((name, self.lazy[name].short_help))
            else:
                cmd = super().get_command(ctx, name)
                if cmd is not None and not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(limit=formatter.width)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(
    cls=LazyGroup,
    context_settings=CONTEXT,
    lazy={
        "demo": LazyCommand("emu.commands.demo:demo", "Run the whole story: each policy over NFS/UDP, NFS/TCP and iSCSI, side by side."),
        "run": LazyCommand("emu.commands.run:run", "Run one emulated host swapping to a real server under one policy."),
        "sweep": LazyCommand("emu.commands.sweep:sweep", "Run a scenario over a grid of its keys: P(stuck) heatmaps, CSV, resumable."),
        "reserve": LazyCommand("emu.commands.reserve:reserve", "Size the v12 memory reserve tree, as /proc/reserve_info shows it."),
        "inject": LazyCommand("emu.commands.inject:inject", "Send bounded background traffic (scapy) to loopback ports."),
        "compare": LazyCommand("emu.commands.compare:compare", "Compare runs side by side (JSON results): what differs, and one overlaid figure."),
    },
)
@click.version_option(package_name="netswap")
def cli() -> None:
    """netswap: swap over networked storage, emulated on loopback.

    An emulated Linux host with bounded memory pages to real NFSv3 and iSCSI servers while
    background traffic competes for its memory. Run it under a vanilla kernel (policy `none`),
    the 2007 seed's reserve design (`v12`) or Linux 3.6's pfmemalloc design (`pfmemalloc`) and
    watch the deadlock appear or not.

    Exit status: 0 success, 1 error, 2 usage error, 3 deadlock.
    """


@cli.group(
    cls=LazyGroup,
    context_settings=CONTEXT,
    lazy={
        "nfs": LazyCommand("emu.commands.serve_nfs:serve_nfs", "Serve a directory over MOUNT v3 and NFSv3 (UDP and TCP)."),
        "iscsi": LazyCommand("emu.commands.serve_iscsi:serve_iscsi", "Serve files as the disk LUNs of an iSCSI target."),
    },
)
def serve() -> None:
    """Run one of netswap's real servers (not emulated) on loopback."""


@cli.group(
    cls=LazyGroup,
    context_settings=CONTEXT,
    lazy={
        "swap-local": LazyCommand("emu.bench.swap_local:bench_swap_local", "Swap N pages through local-file storage vs plain file I/O."),
        "swap": LazyCommand("emu.bench.swap:bench_swap", "Emulated host swap throughput vs the same client unemulated."),
        "rx": LazyCommand("emu.bench.rx:bench_rx", "Receive stage frames/s vs a bare trio batch-drain loop."),
        "inject": LazyCommand("emu.bench.inject:bench_inject", "Injector packets/s vs a plain UDP sendto loop."),
        "nfs": LazyCommand("emu.bench.nfs:bench_nfs", "nfs-cp into/out of our server vs nfs-ganesha."),
        "iscsi": LazyCommand("emu.bench.iscsi:bench_iscsi", "iscsi-perf against our target vs tgtd."),
    },
)
def bench() -> None:
    """Benchmarks. Each prints its figure, a baseline measured in the same run, and the ratio."""


def main() -> None:
    from emu.util.signals import die_with_parent

    die_with_parent()  # a server started by `netswap run` dies with it
    cli(prog_name="netswap")


if __name__ == "__main__":
    main()
