"""The emulated host, assembled and run: kernel, user space, background traffic, the run loop and
its verdict, the result and its rendering.

    from emu.host import run_scenario
    result = run_scenario(scenario.load("demo").replace(policy="v12"))
"""

from __future__ import annotations

from emu.host.launch import run_host, run_matrix, run_scenario
from emu.host.result import RunResult, RunStatus, exit_status

__all__ = ["RunResult", "RunStatus", "exit_status", "run_host", "run_matrix", "run_scenario"]
