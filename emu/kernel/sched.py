"""The task context `current`: task name, PF_* flags, TIF_MEMDIE, softirq.

Each trio task carries a `contextvars` context, so `current()` follows trio tasks naturally: code run
inside `task(...)`, and trio tasks started from there, run as that Task.  The flags live on the Task
object (as in the kernel), so trio tasks that share one Task share its flags; give every concurrent
worker its own `task()`.
"""

from __future__ import annotations

import contextvars
import enum
import itertools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


class TaskFlags(enum.IntFlag):
    PF_MEMALLOC = 0x00000800  # allocating memory to free memory: may use the reserve
    PF_KSWAPD = 0x00040000
    PF_KTHREAD = 0x00200000

    def __str__(self) -> str:
        if not self.value:
            return "0"
        return "|".join(m.name or "" for m in TaskFlags if m.value & self.value)


_pids = itertools.count(1)


@dataclass(eq=False)
class Task:
    comm: str
    flags: TaskFlags = TaskFlags(0)
    tif_memdie: bool = False
    in_softirq: bool = False
    state: str = "R"
    wchan: str = ""
    pid: int = field(default_factory=lambda: next(_pids))

    @property
    def is_kthread(self) -> bool:
        return bool(self.flags & TaskFlags.PF_KTHREAD)

    def __str__(self) -> str:
        return f"{self.comm}[{self.pid}] {self.state} {self.wchan or '-'} flags={self.flags}"


SWAPPER = Task("swapper", TaskFlags.PF_KTHREAD, pid=0)

_current: contextvars.ContextVar[Task] = contextvars.ContextVar("current", default=SWAPPER)
_tasks: weakref.WeakValueDictionary[int, Task] = weakref.WeakValueDictionary()
_tasks[0] = SWAPPER


def current() -> Task:
    return _current.get()


def all_tasks() -> list[Task]:
    """Live tasks (those still referenced), by pid, like `ps`."""
    return [t for _, t in sorted(_tasks.items())]


@contextmanager
def task(comm: str, flags: TaskFlags = TaskFlags(0), *, tif_memdie: bool = False) -> Iterator[Task]:
    """Run the enclosed code (and trio tasks started from it) as a new Task."""
    t = Task(comm, TaskFlags(flags), tif_memdie=tif_memdie)
    _tasks[t.pid] = t
    token = _current.set(t)
    try:
        yield t
    finally:
        t.state = "X"
        _current.reset(token)
        _tasks.pop(t.pid, None)


@contextmanager
def memalloc_noreclaim() -> Iterator[Task]:
    """memalloc_noreclaim_save()/restore(): PF_MEMALLOC for the enclosed code, then the old value."""
    t = _current.get()
    had = t.flags & TaskFlags.PF_MEMALLOC
    t.flags |= TaskFlags.PF_MEMALLOC
    try:
        yield t
    finally:
        if not had:
            t.flags &= ~TaskFlags.PF_MEMALLOC


@contextmanager
def softirq() -> Iterator[Task]:
    """Run the enclosed (synchronous) code in softirq context, as net_rx_action does."""
    t = _current.get()
    was = t.in_softirq
    t.in_softirq = True
    try:
        yield t
    finally:
        t.in_softirq = was


@contextmanager
def waiting(state: str, wchan: str) -> Iterator[Task]:
    """Mark the current task blocked (`state`, e.g. "D reclaim") at `wchan` while inside."""
    t = _current.get()
    old = (t.state, t.wchan)
    t.state, t.wchan = state, wchan
    try:
        yield t
    finally:
        t.state, t.wchan = old
