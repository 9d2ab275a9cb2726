"""One-line errors for every netswap command: `netswap: error: <message>`, exit 1 or 2.

Shared by `netswap run`/`demo` and the serve commands (which are also standalone servers), so
a bad option reads the same everywhere and never prints click's three-line usage block.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable
from typing import Any, NoReturn

import click

from emu.util.units import parse_size

EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(click.ClickException):
    """A failure told in one line: `netswap: error: <message>` (exit 1)."""

    exit_code = EXIT_ERROR

    def show(self, file: Any = None) -> None:
        click.echo(f"netswap: error: {self.format_message()}", err=True)


class CliUsageError(CliError):
    """A bad option, told in one line (exit 2)."""

    exit_code = EXIT_USAGE


def usage(message: str) -> NoReturn:
    raise CliUsageError(message)


class OneLineCommand(click.Command):
    """Option errors (click's multi-line usage message) become one `netswap: error:` line."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as e:
            usage(e.format_message())


SizeCallback = Callable[[click.Context, click.Parameter, "str | None"], "int | None"]


def size_option(minimum: int = 0, expected: str = "") -> SizeCallback:
    """A size option's callback (`16M`, `512K`, a byte count: `parse_size`'s one grammar): no
    value passes as None; a bad one, or one below `minimum` bytes, is a one-line usage error that
    names the option (`--ram 12Q: expected a size ...`) and says what was `expected`."""

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
        if value is None:
            return None
        flag = param.opts[0] if param.opts else param.name
        try:
            n = parse_size(value)
        except ValueError as e:
            usage(f"{flag} {value}: {e}")
        if n < minimum:
            usage(f"{flag} {value}: {expected or f'must be at least {minimum} bytes'}")
        return n

    return check


def loopback_bind(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """`--bind`'s callback: our servers listen on loopback only (they are test and teaching
    servers with no authentication worth the name), so anything else is a usage error."""
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        usage(f"--bind {value}: not an IP address")
    if not addr.is_loopback:
        usage(f"--bind {value}: not a loopback address; the server listens on loopback only "
              "(127.0.0.0/8 or ::1)")
    return value


class Seconds(click.FloatRange):
    """A duration option: a finite number of seconds within the range (click's FloatRange lets
    NaN through, since NaN fails every comparison, and NaN would disable a timer silently)."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return v
