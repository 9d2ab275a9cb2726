"""The live progress of runs: a rich table (a terminal) or a line every two seconds (a pipe)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from emu.host.report import outcome_style
from emu.host.result import RunStatus
from emu.kernel.policy import Policy


def _n(x: int) -> str:
    """A count in at most 5 characters (12345, 123k, 12.3M)."""
    x = int(x)
    if x < 100_000:
        return str(x)
    if x < 10_000_000:
        return f"{x // 1000}k"
    return f"{x / 1e6:.1f}M" if x < 100_000_000 else f"{x // 1_000_000}M"


class LiveProgress:
    """A rich live table with one row per run: phase, workload progress, memory, swap, drops."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled and console.is_terminal
        self.rows: dict[tuple[str, Policy], RunStatus | None] = {}
        self.order: list[tuple[str, Policy]] = []
        self._live: Live | None = None
        self._last_plain = 0.0
        self.plain = enabled and not console.is_terminal

    def __enter__(self) -> "LiveProgress":
        if self.enabled:
            self._live = Live(self._render(), console=self.console, refresh_per_second=8, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(None, None, None)

    def add_run(self, backend: str, policy: Policy) -> None:
        key = (backend, policy)
        if key not in self.rows:
            self.order.append(key)
            self.rows[key] = None

    def update(self, status: RunStatus) -> None:
        key = (status.backend, status.policy)
        self.add_run(*key)
        self.rows[key] = status
        if self._live is not None:
            self._live.update(self._render())
        elif self.plain and (time.monotonic() - self._last_plain > 2.0 or status.phase in ("completed", "deadlock", "livelock")):
            self._last_plain = time.monotonic()
            self.console.print(self._line(status), markup=False, highlight=False, soft_wrap=True)

    @staticmethod
    def _line(s: RunStatus) -> str:
        stall = f"{s.stalled_for:.1f}s" if s.phase not in ("completed",) else "-"
        return (f"{s.backend}/{s.policy} {s.phase} t={s.t:.3f}s work {s.done}/{s.total} free {s.nr_free} "
                f"(min {s.wmark_min}) swpout {s.pswpout} swpin {s.pswpin} drops {s.drops} stall {stall}")

    def _render(self) -> Table:
        """One row per run, within 80 columns: the run on two lines, no bars."""
        t = Table(expand=False, title="netswap (emulated time)", box=None, pad_edge=False, padding=(0, 1),
                  show_edge=False)
        for c, just in (("run", "left"), ("phase", "left"), ("t", "right"), ("work", "right"),
                        ("free/min", "right"), ("resv", "right"), ("swap o/i", "right"), ("drops", "right"),
                        ("stall", "right")):
            t.add_column(c, justify=just, no_wrap=True)  # type: ignore[arg-type]
        for key in self.order:
            s = self.rows[key]
            run = f"{key[0]}\n{key[1]}"
            if s is None:
                t.add_row(run, "waiting", "", "", "", "", "", "", "")
                continue
            frac = s.done / s.total if s.total else 0.0
            phase = outcome_style(s.phase) if s.phase in ("completed", "deadlock", "livelock") else s.phase
            # stalled: how long the watchdog has seen no progress with tasks blocked; a run that
            # completed was never stuck, so it shows none
            stall = "–" if s.phase == "completed" or s.stalled_for <= 0 else f"{s.stalled_for:.1f}s"
            resv = "–" if s.policy is Policy.NONE else f"{s.reserve_used}"
            t.add_row(run, phase, f"{s.t:.2f}s", f"{frac:.0%}", f"{s.nr_free}/{s.wmark_min}", resv,
                      f"{_n(s.pswpout)}/{_n(s.pswpin)}", _n(s.drops), stall)
        return t
