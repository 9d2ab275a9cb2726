"""Child processes: stop one politely, then firmly."""

from __future__ import annotations

import contextlib
import signal
import subprocess


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 5.0,
                 sig: int = signal.SIGTERM) -> int | None:
    """`sig` (SIGTERM; SIGINT for a tool that reports on Ctrl-C), wait `grace` seconds, then SIGKILL:
    only the process we started, by its pid. Returns its exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(grace)
    return proc.returncode
