"""Stopping a run cleanly on SIGINT (Ctrl-C) and SIGTERM: one line, exit 130 / 143.

SIGTERM is turned into SIGINT, which trio delivers as KeyboardInterrupt at a point where the
run can unwind (its servers stopped, temporary LUNs removed, results so far written); which
signal it was is remembered for the exit status (128 + signal number, as a shell reports it).
Child processes we start die with us even if we are killed outright: by `PR_SET_PDEATHSIG`
when the main thread started them, else (a Dask worker runs its tasks in a thread pool) by
watching for the parent to change.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from types import FrameType
from typing import NoReturn

PARENT_ENV = "NETSWAP_DIE_WITH_PARENT"  # the pid a child of ours dies with ("PID" or "PID:watch")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_WATCH_S = 0.5  # how often a watching child looks at its parent


class Interrupts:
    """Which signal interrupted the command (SIGINT unless a SIGTERM came first)."""

    def __init__(self) -> None:
        self.signum = signal.SIGINT

    @property
    def exit_status(self) -> int:
        return 128 + int(self.signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[Interrupts]:
    """Within the block, SIGTERM interrupts like Ctrl-C (KeyboardInterrupt)."""
    state = Interrupts()

    def on_term(signum: int, frame: FrameType | None) -> None:
        state.signum = signal.SIGTERM
        # Whatever handles SIGINT now (trio's, which raises KeyboardInterrupt only where it is
        # safe, or Python's default) handles this one; no second signal is raised.
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, old)


def exit_interrupted(state: Interrupts) -> NoReturn:
    """Exit 130/143 once everything is stopped and written.  `os._exit`, not `sys.exit`: the
    interpreter, having seen a KeyboardInterrupt, now and then reported a death by SIGINT
    (status -2) instead of the status asked for (seen with `python -m`, 1 run in 5)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(state.exit_status)


def is_interrupt(e: BaseException) -> bool:
    """A KeyboardInterrupt, or an exception group (trio's nurseries) holding one."""
    if isinstance(e, KeyboardInterrupt):
        return True
    if isinstance(e, BaseExceptionGroup):
        return any(is_interrupt(x) for x in e.exceptions)
    return False


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child netswap process that must not outlive this one. From the
    main thread the kernel tells the child (PR_SET_PDEATHSIG); from another one the child
    watches its parent instead: PR_SET_PDEATHSIG fires when the *thread* that forked the child
    ends, which would stop it early, or (that thread alive) would not fire at all."""
    import threading

    out = dict(os.environ if env is None else env)
    main = threading.current_thread() is threading.main_thread()
    out[PARENT_ENV] = str(os.getpid()) if main else f"{os.getpid()}:watch"
    return out


def die_with_parent() -> None:
    """In a child started with `child_env`: ask the kernel for SIGTERM when the parent dies
    (also by SIGKILL), or watch for it in a daemon thread and SIGTERM ourselves; exit at once
    if it already has."""
    want = os.environ.pop(PARENT_ENV, None)
    if not want or not sys.platform.startswith("linux"):
        return
    pid, _, how = want.partition(":")
    if how != "watch":
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if str(os.getppid()) != pid:  # the parent died before the prctl took effect
        os._exit(143)
    if how == "watch":
        import threading

        threading.Thread(target=_watch_parent, args=(int(pid),), name="netswap-parent-watch", daemon=True).start()


def _watch_parent(pid: int) -> None:
    """Until the parent is gone (we are reparented), then SIGTERM: stop as on `kill`."""
    import time

    while os.getppid() == pid:
        time.sleep(PARENT_WATCH_S)
    os.kill(os.getpid(), signal.SIGTERM)
