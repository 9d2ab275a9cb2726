"""Child processes: stop one politely, then firmly; the CPU time one has used."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all its threads) a live process has used so far, from
    /proc/PID/stat (in clock ticks: 10 ms steps)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
