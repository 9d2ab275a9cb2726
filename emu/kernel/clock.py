"""Emulated time: the host's clock moves by the model's work, never by the machine's speed.

`EmuClock` is the `trio.abc.Clock` of one emulated host's `trio.run`, so every `trio.sleep`,
timeout and `trio.current_time()` inside the host (kswapd, congestion_wait, RPC retransmits, the
TCP re-offer, ipfrag_time, the watchdog, the traffic's pacing...) is in emulated seconds.  Time
advances in three ways only:

1. `charge(seconds)`: the modelled cost of work done by the host's one CPU (`emu.kernel.cpu`).
   Work is serial, as on a uniprocessor: two tasks' charges add up.
2. A jump to the next timer when no task can run (trio consults the clock only then), as a
   discrete-event simulator advances to its next event (ns-3's default simulator; trio's
   `MockClock` with `autojump_threshold=0`).
3. While a real peer is unreachable or silent (connection refused or reset, or no answer for
   `grace` wall seconds), at the rate of the wall clock, like ns-3's real-time simulator: an
   outage is a real-world event, and the restart of a real server takes real time.

**Inputs from the real world.**  The host's peers are real: our servers (or ganesha, tgtd) and
the traffic generator's datagrams crossing real loopback sockets.  Whoever sends something that a
real socket will answer registers an `Awaited` input with the emulated time it is *due* (a reply:
departure + the modelled round trip; a datagram: its send time).  The clock never passes a due
time while that input has not physically arrived: a `charge` that would cross it first reads the
source (`Source.pull`), and blocks in wall time until the bytes are there; a jump stops at it and
lets trio wait for the socket.  So a reply is seen exactly when the model says, no earlier (the
wire holds early bytes until they are due) and no later (however long the real peer took: that
wall time does not count).

**Scheduling.**  With `deterministic_scheduling()`, trio never reverses a batch of runnable
tasks at random (it runs each batch from its end: the task made runnable last runs first); together with the
above, the same scenario gives the same run, step for step, on a fast, slow or busy machine.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import random
import select
from collections.abc import Iterator
from time import perf_counter
from typing import Protocol

import trio

GRACE_DEFAULT = 10.0  # wall seconds a real peer may take before the clock stops waiting for it


class Source(Protocol):
    """Something that reads real input for the host (a wire): `pull` reads what has arrived
    without processing it (marking the inputs it completes as arrived)."""

    grace: float  # wall seconds to wait for an awaited input from it, at most

    def pull(self) -> object: ...

    def fileno(self) -> int: ...

    def late(self, a: Awaited) -> None:
        """`a` did not come within `grace`: the clock stopped waiting for it."""
        ...


class Awaited:
    """One real input the host is waiting for, due at emulated time `due`."""

    __slots__ = ("due", "source", "live", "seq")

    def __init__(self, due: float, source: Source, seq: int) -> None:
        self.due = due
        self.source = source
        self.live = True
        self.seq = seq

    def __lt__(self, other: Awaited) -> bool:
        return (self.due, self.seq) < (other.due, other.seq)

    def __repr__(self) -> str:
        return f"<Awaited due={self.due:.6f} {'live' if self.live else 'done'} from {self.source!r}>"


class ClockStats:
    __slots__ = ("charged", "jumps", "jumped", "waits", "wall_waited", "late", "realtime_s")

    def __init__(self) -> None:
        self.charged = 0.0  # emulated seconds of modelled CPU work
        self.jumps = 0  # idle jumps to the next timer
        self.jumped = 0.0  # emulated seconds skipped by them
        self.waits = 0  # times the clock held for a real input not yet arrived
        self.wall_waited = 0.0  # wall seconds spent so
        self.late = 0  # awaited inputs given up after `grace` (peer silent)
        self.realtime_s = 0.0  # emulated seconds run at the wall clock's rate (peer unreachable)

    def to_json(self) -> dict[str, float | int]:
        return {k: (round(getattr(self, k), 6) if isinstance(getattr(self, k), float) else getattr(self, k))
                for k in self.__slots__}


class EmuClock(trio.abc.Clock):
    """See the module docstring.  `now` is the emulated time in seconds since the run began."""

    def __init__(self, *, grace: float = GRACE_DEFAULT, start: float = 0.0) -> None:
        if not grace > 0:
            raise ValueError("grace must be positive")
        self.now = float(start)
        self.grace = grace
        self.stats = ClockStats()
        self._heap: list[Awaited] = []
        self._horizon = math.inf  # <= the earliest live due time (exact after _clean)
        self._seq = itertools.count()
        self._holds = 0  # real operations in flight (connect, a send that blocked)
        self._down: set[object] = set()  # peers unreachable or silent
        self._rt_wall: float | None = None  # wall time when realtime began
        self._rt_emu = 0.0  # emulated time then
        self._waiting_for: Awaited | None = None
        self._waiting_since = 0.0

    # ---- trio.abc.Clock ----------------------------------------------------------------------

    def start_clock(self) -> None:
        """Nothing to start: emulated time begins at 0 and moves only by the model's work."""

    def current_time(self) -> float:
        if self._rt_wall is not None:
            t = self._rt_emu + (perf_counter() - self._rt_wall)
            if t > self.now:
                self.now = t
        return self.now

    def deadline_to_sleep_time(self, deadline: float) -> float:
        """Called by trio only when no task is runnable: jump, or wait for the real world."""
        now = self.current_time()
        h = self._clean()
        if self._rt_wall is not None:  # realtime: sleep in wall seconds until the next event
            if h <= now:
                return self._wait_for_input(now)
            return max(0.0, min(deadline, h) - now)
        if h <= deadline and h != math.inf:
            if h > now:  # nothing else happens before the input is due
                self.stats.jumps += 1
                self.stats.jumped += h - now
                self.now = now = h
            return self._wait_for_input(now)
        self._waiting_for = None
        if self._holds:
            return 0.05  # a real operation is in flight: let trio wait for it, do not jump
        if deadline > now:
            if deadline == math.inf:
                return 1.0  # nothing scheduled at all: wait for any real I/O, in wall time
            self.stats.jumps += 1
            self.stats.jumped += deadline - now
            self.now = deadline
        return 0.0

    # ---- modelled work -----------------------------------------------------------------------

    def charge(self, seconds: float) -> None:
        """The host's CPU did `seconds` of modelled work: time passes, but never past an input
        that is due and has not arrived (it is read first, waiting for it in wall time)."""
        t = self.now + seconds
        if t >= self._horizon:
            self._settle(t)
        self.now = t
        self.stats.charged += seconds

    # ---- inputs from the real world ----------------------------------------------------------

    def expect(self, due: float, source: Source) -> Awaited:
        """Register an input `source` will read, due at emulated time `due`."""
        a = Awaited(due, source, next(self._seq))
        heapq.heappush(self._heap, a)
        if due < self._horizon:
            self._horizon = due
        return a

    def arrived(self, a: Awaited) -> None:
        """The input has been read from the real socket (or will never come: cancelled)."""
        if a.live:
            a.live = False
            if self._waiting_for is a:
                self._waiting_for = None
        # the heap keeps it until it reaches the top (lazy deletion); _horizon may now be low,
        # which only costs a _clean.

    def suspend(self, a: Awaited) -> None:
        """Its source cannot take the input now (a TCP wire holding a dropped chunk, or with its
        receive window closed): it stops holding the clock until `resume`."""
        self.arrived(a)

    def resume(self, a: Awaited) -> Awaited:
        """Hold the clock for a suspended input again (due now at the earliest); returns the new
        registration."""
        return self.expect(max(a.due, self.now), a.source)

    @property
    def horizon(self) -> float:
        """The earliest due time of an input not yet arrived (inf: none)."""
        return self._clean()

    def _clean(self) -> float:
        heap = self._heap
        while heap and not heap[0].live:
            heapq.heappop(heap)
        self._horizon = h = heap[0].due if heap else math.inf
        return h

    def _settle(self, t: float) -> None:
        """Before time passes `t`, every live input due by then must be read from its source."""
        heap = self._heap
        wall_deadline = 0.0
        while True:
            while heap and not heap[0].live:
                heapq.heappop(heap)
            if not heap or heap[0].due > t:
                break
            a = heap[0]
            a.source.pull()
            if not a.live:
                continue
            # Not there yet: wait, in wall time, for the sources of every input due by t.
            now_wall = perf_counter()
            if not wall_deadline:
                wall_deadline = now_wall + a.source.grace
            left = wall_deadline - now_wall
            if left <= 0:
                self._late(a)
                wall_deadline = 0.0
                continue
            pending = {w.source for w in heap if w.live and w.due <= t}
            poller = select.poll()
            by_fd = {}
            for s in pending:
                with contextlib.suppress(OSError, ValueError):
                    fd = s.fileno()
                    if fd >= 0:
                        by_fd[fd] = s
                        poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
            if not by_fd:
                self._late(a)
                continue
            self.stats.waits += 1
            ready = poller.poll(left * 1000)
            self.stats.wall_waited += perf_counter() - now_wall
            for fd, _ in ready:
                by_fd[fd].pull()
        self._horizon = heap[0].due if heap else math.inf

    def _wait_for_input(self, now: float) -> float:
        """Trio is idle at an input's due time: let it wait for the socket (wall seconds)."""
        a = self._heap[0]
        if self._waiting_for is not a:
            self._waiting_for = a
            self._waiting_since = perf_counter()
            self.stats.waits += 1
        waited = perf_counter() - self._waiting_since
        left = a.source.grace - waited
        if left <= 0:
            self.stats.wall_waited += waited
            self._late(a)
            return 0.0
        return min(left, 0.5)

    def _late(self, a: Awaited) -> None:
        """An input did not come within its source's grace: stop waiting for it; the source
        decides what that means (a silent peer: `peer_down`; a lost datagram: a count)."""
        self.stats.late += 1
        self.arrived(a)
        a.source.late(a)

    # ---- real operations and unreachable peers -----------------------------------------------

    @contextlib.contextmanager
    def real_io(self) -> Iterator[None]:
        """Around an await on a real operation whose end the model cannot predict (a TCP connect,
        a send that found the socket full): no idle jump while it is in flight."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1

    def peer_down(self, peer: object) -> None:
        """A real peer refused, reset or stopped answering: follow the wall clock until it is up."""
        if not self._down:
            self.current_time()
            self._rt_wall = perf_counter()
            self._rt_emu = self.now
        self._down.add(peer)

    def peer_up(self, peer: object) -> None:
        if peer in self._down:
            self._down.discard(peer)
            if not self._down and self._rt_wall is not None:
                self.current_time()
                self.stats.realtime_s += self.now - self._rt_emu
                self._rt_wall = None

    @property
    def realtime(self) -> bool:
        return self._rt_wall is not None


class _FifoRandom(random.Random):
    """trio reverses a batch of runnable tasks when `random() < 0.5`: never.  trio then runs the
    batch by popping from its end, so within a batch the task made runnable last runs first: one
    fixed order (which one does not matter; that it never changes does)."""

    def random(self) -> float:
        return 1.0


_deadline_seq = itertools.count()


def _tiebreak(cancel_scope: trio.CancelScope) -> tuple[int, int]:
    """Ties between equal deadlines go to the task spawned first among those the scope guards
    (whoever set the deadline), then to the scope registered first: trio breaks them by the
    scope's address, which differs from run to run."""
    rank = -1
    try:
        tasks = cancel_scope._cancel_status._tasks  # type: ignore[union-attr]
        if tasks:
            rank = min(t._counter for t in tasks)
        else:
            rank = trio.lowlevel.current_task()._counter  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        pass
    return rank, next(_deadline_seq)


def _deadlines_add(self: object, deadline: float, cancel_scope: trio.CancelScope) -> None:
    heapq.heappush(self._heap, (deadline, _tiebreak(cancel_scope), cancel_scope))  # type: ignore[attr-defined]
    self._active += 1  # type: ignore[attr-defined]


def _counter(task: object) -> int:
    return task._counter  # type: ignore[attr-defined,no-any-return]


def _event_set(self: trio.Event) -> None:
    """trio.Event.set, waking the waiters in the order they were spawned: trio keeps them in a
    set, so they would wake in the order of their addresses."""
    if not self._flag:  # type: ignore[attr-defined]
        self._flag = True  # type: ignore[attr-defined]
        tasks = self._tasks  # type: ignore[attr-defined]
        for task in sorted(tasks, key=_counter) if len(tasks) > 1 else tasks:
            trio.lowlevel.reschedule(task)
        tasks.clear()


@contextlib.contextmanager
def deterministic_scheduling() -> Iterator[None]:
    """Make trio's scheduling of the enclosed `trio.run` a function of the host's events only.

    - Each batch of runnable tasks runs in one fixed order (from its end): trio reverses
      half the batches at random (the generator is `trio._core._run._r`), and under hypothesis
      (as under pytest) sorts and shuffles them instead (`_ALLOW_DETERMINISTIC_SCHEDULING`).
    - Timers that expire at the same emulated time wake their tasks in the order the tasks were
      spawned, not by the address of their cancel scopes (`Deadlines.add`).
    - `trio.Event.set` wakes its waiters in the order they were spawned, not by their addresses.

    These are private names (the project pins trio < 0.40, and a test checks they are there).
    The host's run is then scheduled the same way from the command line and under pytest."""
    from trio._core import _run

    old = _run._r, _run._ALLOW_DETERMINISTIC_SCHEDULING, _run.Deadlines.add, trio.Event.set
    _run._r = _FifoRandom()
    _run._ALLOW_DETERMINISTIC_SCHEDULING = False  # type: ignore[misc]
    _run.Deadlines.add = _deadlines_add  # type: ignore[method-assign,assignment]
    trio.Event.set = _event_set  # type: ignore[method-assign]
    try:
        yield
    finally:
        (_run._r, _run._ALLOW_DETERMINISTIC_SCHEDULING, _run.Deadlines.add,  # type: ignore[misc,method-assign]
         trio.Event.set) = old  # type: ignore[method-assign]
