"""What a run produces: its live status, its result, and the files written for it.

Times are emulated seconds (`t`, `emulated_s`) unless named wall (`wall_s`): the verdict is the
model's, the wall clock only says how long a person waited.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emu.host.timeline import Recorder, plot, write_csv, write_jsonl
from emu.kernel.policy import Policy

# outcome -> exit status of `netswap run`
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_STUCK = 0, 1, 2, 3
STUCK = ("deadlock", "livelock")
# server_down: the run ended while its swap server did not answer (an error, not a verdict on
# the memory policy); interrupted: SIGINT/SIGTERM (exit 130/143, set by the command)
OUTCOMES = ("completed", "deadlock", "livelock", "timeout", "server_down", "error", "interrupted")


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run(s): `results` are those finished, then the interrupted one
    (outcome `interrupted`, its counters as they were)."""

    def __init__(self, results: list[RunResult]) -> None:
        super().__init__("interrupted")
        self.results = results


def exit_status(outcome: str) -> int:
    if outcome == "completed":
        return EXIT_OK
    if outcome in STUCK:
        return EXIT_STUCK
    return EXIT_ERROR


@dataclass
class RunStatus:
    """A snapshot for the live progress table."""

    backend: str
    policy: Policy
    phase: str
    t: float = 0.0  # emulated seconds since the run began
    done: int = 0
    total: int = 0
    nr_free: int = 0
    wmark_min: int = 0
    reserve_used: int = 0
    pswpout: int = 0
    pswpin: int = 0
    drops: int = 0
    stalled_for: float = 0.0
    reserve_size: int = 0  # pages (v12's reserve tree, pfmemalloc's min watermark)
    server_down: bool = False  # the swap server is not answering (emu.net.link.PeerLink.down_since)


@dataclass
class RunResult:
    outcome: str  # one of OUTCOMES
    policy: Policy
    backend: str
    server: str
    ram: int
    page_size: int
    seed: int = 0
    pages_swapped_out: int = 0
    pages_swapped_in: int = 0
    integrity: dict[str, Any] = field(default_factory=lambda: {"verified": 0, "mismatches": 0})
    drops: dict[str, int] = field(default_factory=dict)
    reserve: dict[str, int] = field(default_factory=lambda: {"size": 0, "peak": 0})
    emulated_s: float = 0.0  # the run's length in emulated time
    wall_s: float = 0.0  # and on the wall clock
    accesses_done: int = 0
    accesses_total: int = 0
    min_free: int = 0
    wmark_min: int = 0
    atomic_floor: int = 0
    stall: dict[str, Any] | None = None  # where the verdict was declared (emulated time)
    progress_rate: float = 0.0  # pages reclaimed + swap I/O completed per emulated second
    swap_retransmits: int = 0
    emergency_skbs: int = 0
    traffic: dict[str, Any] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)
    clock: dict[str, Any] = field(default_factory=dict)
    vmstat: dict[str, int] = field(default_factory=dict)
    socket_drops: dict[str, dict[str, int]] = field(default_factory=dict)  # per socket, per drop counter
    views: dict[str, str] = field(default_factory=dict)  # /proc texts at the end (meminfo, reserve_info, ...)
    pcap: dict[str, Any] = field(default_factory=dict)  # --pcap: what the file holds
    # when the swap server was down (emulated seconds; up_at None: still down at the end), and
    # what the transport said about it ("server 127.0.0.1 not responding, still trying", ...)
    server_outages: list[dict[str, Any]] = field(default_factory=list)
    server_events: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    report: str = ""
    files: dict[str, str] = field(default_factory=dict)
    timeline: Recorder | None = field(default=None, repr=False)  # in memory only; files["timeline_*"] on disk

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("report", "timeline")}
        d["policy"] = self.policy.value
        d["deadlock_report"] = self.report or None
        return d

    @property
    def exit_status(self) -> int:
        return exit_status(self.outcome)


def write_outputs(res: RunResult, out_dir: Path, stem: str, recorder: Recorder | None = None,
                  verdict_at: float | None = None) -> None:
    """The timeline (PNG, and its data as CSV and JSON lines), the report (for a stuck run) and
    the JSON, into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if recorder is not None and recorder.samples:
        png = plot(recorder, out_dir / f"{stem}.png",
                   f"netswap {res.backend} / policy {res.policy}: {res.outcome} "
                   f"({res.pages_swapped_out} pages out, {res.pages_swapped_in} in)",
                   deadlock_at=verdict_at, policy=res.policy, verdict=res.outcome)
        res.files["timeline"] = str(png)
        res.files["timeline_csv"] = str(write_csv(recorder, out_dir / f"{stem}-timeline.csv"))
        res.files["timeline_jsonl"] = str(write_jsonl(recorder, out_dir / f"{stem}-timeline.jsonl"))
    if res.report:
        rp = out_dir / f"{stem}-{res.outcome}.txt"
        rp.write_text(res.report)
        res.files["report"] = str(rp)
    jp = out_dir / f"{stem}.json"
    res.files["json"] = str(jp)
    jp.write_text(json.dumps(res.to_json(), indent=2) + "\n")
