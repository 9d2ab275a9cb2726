"""The watchdog never calls a server outage a deadlock (emu.host.watchdog)."""

from __future__ import annotations

from emu.host.watchdog import Watchdog

BLOCKED = [("workload0", "D reclaim", "congestion_wait")]


def feed(dog: Watchdog, t0: float, t1: float, progress: int, down: bool, step: float = 0.01):  # type: ignore[no-untyped-def]
    t = t0
    while t < t1 - 1e-9:
        v = dog.observe(round(t, 6), progress, BLOCKED, 16, 0, server_down=down)
        if v is not None:
            return v
        t += step
    return None


def test_no_progress_while_the_server_is_down_is_not_a_deadlock() -> None:
    dog = Watchdog(stall=1.5)
    assert feed(dog, 0.0, 1.0, 100, False) is None
    assert feed(dog, 1.0, 30.0, 100, True) is None  # down for 29 s: held
    assert dog.stalled_for(30.0) == 0.0


def test_after_the_outage_a_stall_is_judged_afresh() -> None:
    dog = Watchdog(stall=1.5)
    feed(dog, 0.0, 1.0, 100, False)
    feed(dog, 1.0, 3.0, 100, True)  # down (or its I/O still in flight: HostRun passes both)
    v = feed(dog, 3.0, 6.0, 100, False)  # back, and no progress: a real stall, counted from 3.0
    assert v is not None and v.kind == "deadlock" and 4.5 <= v.at <= 4.6


def test_without_an_outage_the_verdict_is_unchanged() -> None:
    a, b = Watchdog(stall=1.5), Watchdog(stall=1.5)
    va = feed(a, 0.0, 5.0, 7, False)
    vb = None
    t = 0.0
    while vb is None and t < 5.0:
        vb = b.observe(round(t, 6), 7, BLOCKED, 16, 0)
        t += 0.01
    assert va is not None and vb is not None and (va.kind, va.at) == (vb.kind, vb.at)
