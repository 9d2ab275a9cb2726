"""The emulated clock: charges, idle jumps, and inputs awaited from the real world."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import trio

from emu.kernel.clock import Awaited, EmuClock, deterministic_scheduling
from emu.kernel.cpu import Costs, Cpu


class PairSource:
    """A real socket the clock may wait on: `pull` reads what arrived, as a wire does."""

    def __init__(self, clock: EmuClock, grace: float = 5.0) -> None:
        self.clock = clock
        self.grace = grace
        self.a, self.b = socket.socketpair()
        self.a.setblocking(False)
        self.awaited: list[Awaited] = []
        self.pulled_at: list[float] = []
        self.late_ones: list[Awaited] = []

    def fileno(self) -> int:
        return self.a.fileno()

    def pull(self) -> None:
        try:
            data = self.a.recv(65536)
        except BlockingIOError:
            return
        self.pulled_at.append(self.clock.now)
        for _ in data:
            if self.awaited:
                self.clock.arrived(self.awaited.pop(0))

    def late(self, a: Awaited) -> None:
        self.late_ones.append(a)

    def send_later(self, delay: float, data: bytes = b"x") -> threading.Thread:
        t = threading.Thread(target=lambda: (time.sleep(delay), self.b.send(data)))
        t.start()
        return t


def run(fn, clock: EmuClock):  # type: ignore[no-untyped-def]
    with deterministic_scheduling():
        return trio.run(fn, clock=clock)


def test_idle_time_jumps_to_the_next_timer() -> None:
    clock = EmuClock()

    async def main() -> float:
        await trio.sleep(3600)
        return trio.current_time()

    t0 = time.perf_counter()
    assert run(main, clock) == 3600.0
    assert time.perf_counter() - t0 < 5  # an emulated hour is not a wall hour
    assert clock.stats.jumps >= 1 and clock.stats.jumped >= 3600


def test_charged_work_advances_time_serially() -> None:
    clock = EmuClock()
    cpu = Cpu(Costs(), clock)

    async def worker(seconds: float) -> None:
        cpu.charge(seconds)
        await trio.lowlevel.checkpoint()

    async def main() -> float:
        async with trio.open_nursery() as n:
            n.start_soon(worker, 0.25)
            n.start_soon(worker, 0.5)
        return trio.current_time()

    assert run(main, clock) == pytest.approx(0.75)  # one CPU: the two charges add up
    assert cpu.busy == pytest.approx(0.75) and clock.stats.charged == pytest.approx(0.75)


def test_a_timer_after_an_awaited_input_waits_for_the_real_input() -> None:
    clock = EmuClock()
    src = PairSource(clock)

    async def watcher() -> None:
        while not src.pulled_at:
            await trio.lowlevel.wait_readable(src.a)
            src.pull()

    async def main() -> float:
        src.awaited.append(clock.expect(1.0, src))
        src.send_later(0.3)  # the "peer" answers after 0.3 s of wall time
        async with trio.open_nursery() as n:
            n.start_soon(watcher)
            await trio.sleep(2.0)
        return trio.current_time()

    t0 = time.perf_counter()
    assert run(main, clock) == 2.0
    assert time.perf_counter() - t0 >= 0.25  # the clock waited for the real input ...
    assert src.pulled_at == [1.0]  # ... at its due time, not before and not after
    assert clock.stats.waits >= 1 and clock.stats.late == 0


def test_charged_work_does_not_overrun_an_input_that_has_not_arrived() -> None:
    clock = EmuClock()
    src = PairSource(clock)
    cpu = Cpu(Costs(), clock)

    async def main() -> None:
        src.awaited.append(clock.expect(0.5, src))
        src.send_later(0.2)
        cpu.charge(2.0)  # crosses the input's due time: it must be read first

    t0 = time.perf_counter()
    run(main, clock)
    assert time.perf_counter() - t0 >= 0.15
    assert src.pulled_at == [0.0]  # read before the charge moved time (processed afterwards)
    assert clock.now == 2.0 and clock.horizon == float("inf")


def test_an_input_that_never_comes_is_given_up_after_grace() -> None:
    clock = EmuClock()
    src = PairSource(clock, grace=0.3)

    async def main() -> float:
        src.awaited.append(clock.expect(1.0, src))
        await trio.sleep(5.0)
        return trio.current_time()

    t0 = time.perf_counter()
    assert run(main, clock) == 5.0
    assert 0.25 <= time.perf_counter() - t0 < 5
    assert clock.stats.late == 1 and len(src.late_ones) == 1


def test_no_jump_while_a_real_operation_is_in_flight() -> None:
    clock = EmuClock()

    async def main() -> tuple[float, float]:
        a, b = socket.socketpair()
        threading.Thread(target=lambda: (time.sleep(0.2), b.send(b"y"))).start()
        sock = trio.socket.from_stdlib_socket(a)

        async def sleeper() -> None:
            await trio.sleep(10)

        async with trio.open_nursery() as n:
            n.start_soon(sleeper)
            with clock.real_io():
                await sock.recv(1)  # the timer at 10 s must not be jumped to meanwhile
            t_io = trio.current_time()
            n.cancel_scope.cancel()
        return t_io, trio.current_time()

    t_io, _ = run(main, clock)
    assert t_io < 10.0


def test_an_unreachable_peer_makes_the_clock_follow_the_wall() -> None:
    clock = EmuClock()

    async def main() -> float:
        clock.peer_down("server")
        t0 = trio.current_time()
        w0 = time.perf_counter()
        await trio.sleep(0.3)  # real seconds now
        assert time.perf_counter() - w0 >= 0.25
        clock.peer_up("server")
        await trio.sleep(100)  # and jumps again once it is back
        return trio.current_time() - t0

    t0 = time.perf_counter()
    # 100 emulated seconds after at least 0.3 real ones (a stalled machine may add real ones)
    assert 100.3 <= run(main, clock) < 102
    assert time.perf_counter() - t0 < 5
    assert clock.stats.realtime_s >= 0.25


def test_deterministic_scheduling_patches_and_restores_trios_coin() -> None:
    from trio._core import _run

    old = _run._r, _run._ALLOW_DETERMINISTIC_SCHEDULING
    with deterministic_scheduling():
        assert _run._r is not old[0] and _run._r.random() >= 0.5  # batches are never reversed
        assert _run._ALLOW_DETERMINISTIC_SCHEDULING is False  # nor sorted and shuffled
    assert (_run._r, _run._ALLOW_DETERMINISTIC_SCHEDULING) == old


def test_costs_refuse_nonsense() -> None:
    c = Costs()
    assert c.replace(peer_rtt=2e-4).peer_rtt == 2e-4
    for bad in (0, -1.0, float("nan"), float("inf"), "x", True):
        with pytest.raises(ValueError):
            c.replace(peer_rtt=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown cost"):
        c.replace(page_copy=1.0)
    names = [n for n, *_ in Costs.describe()]
    assert names == Costs.names() and all(src for *_, src in Costs.describe())  # every figure has a source
