"""A real `netswap run` / `netswap demo` process, stopped by real signals, and its errors.

SIGINT and SIGTERM: one line, exit 130 / 143, the partial result written, our server (a child
process) stopped and its temporary LUN removed, no process left behind; SIGKILL of the run takes
the server with it (PR_SET_PDEATHSIG).  Bad input is one `netswap: error:` line, never a
traceback, with exit 2 (usage) or 1, and never hangs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from proctree import alive, cmdline, descendants

ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]))


def netswap(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "emu", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_server(p: subprocess.Popen[str], timeout: float = 60.0) -> int:
    """The pid of the `netswap serve` child once it is listening (its ready line is in its log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert p.poll() is None, p.communicate()
        for k in descendants(p.pid):
            if " serve " in cmdline(k):
                args = cmdline(k).split()
                flag = "--lun" if "--lun" in args else "--export"
                work = Path(args[args.index(flag) + 1]).parent if flag in args else None
                if work is not None and any("ready" in f.read_text(errors="replace") for f in work.glob("*.log")):
                    return k
        time.sleep(0.05)
    raise AssertionError("the server never came up")


def stderr_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_run_cleanly(tmp_path: Path, sig: signal.Signals, status: int) -> None:
    out = tmp_path / "r.json"
    p = netswap("run", "--backend", "nfs-udp", "--policy", "v12", "-q", "--json", str(out))
    server = wait_for_server(p)
    work_dir = Path(cmdline(server).split("--export ")[1].split()[0]).parent
    assert work_dir.is_dir()
    time.sleep(1.0)  # into the run (swapon preallocates the 64 MiB swap file: seconds)
    p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    assert p.returncode == status, err
    lines = stderr_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"netswap: interrupted by {sig.name}"), err
    assert "Traceback" not in err
    deadline = time.monotonic() + 10
    while alive(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(server), "the server outlived the run"
    assert not work_dir.exists(), "the server's temporary storage was left behind"
    assert json.loads(out.read_text())["outcome"] == "interrupted"


def test_sigkill_of_run_takes_its_server_along(tmp_path: Path) -> None:
    p = netswap("run", "--backend", "iscsi", "--policy", "v12", "-q")
    server = wait_for_server(p)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=30)
    deadline = time.monotonic() + 15
    while alive(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(server), "the server was orphaned"


# A parent that starts a netswap child from a thread other than its main one (as a Dask worker
# runs a sweep's points), lets that thread end, prints the child's pid and lives on.
_THREAD_PARENT = """
import subprocess, sys, threading, time
from emu.util.signals import child_env
CHILD = "from emu.util.signals import die_with_parent; die_with_parent(); import time; time.sleep(120)"
kid = []
t = threading.Thread(target=lambda: kid.append(subprocess.Popen([sys.executable, "-c", CHILD], env=child_env())))
t.start(); t.join()
print(kid[0].pid, flush=True)
time.sleep(120)
"""


def test_a_child_started_from_a_thread_dies_with_its_parent_not_with_the_thread() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _THREAD_PARENT], env=ENV, stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        time.sleep(1.5)  # the thread that started it has ended: the child stays (PR_SET_PDEATHSIG would not)
        assert alive(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), "the child was orphaned"
    finally:
        parent.kill()
        parent.wait()
        if child and alive(child):
            os.kill(child, signal.SIGKILL)


def test_an_interrupt_while_a_finished_runs_files_are_written_keeps_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C that lands after a run has ended, while its files are being written (its JSON
    may be there already): the run is still among the finished ones the demo shows. Once, CI's
    interrupted demo (below) lost it so, with the JSON on disk."""
    from emu import scenario as scen
    from emu.host.launch import run_matrix
    from emu.host.result import RunInterrupted
    from emu.kernel.policy import Policy

    def interrupted_write(*args: object, **kw: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("emu.host.launch.write_outputs", interrupted_write)
    with pytest.raises(RunInterrupted) as e:
        run_matrix(scen.default(), ["iscsi"], [Policy.V12], out_dir=tmp_path)
    assert [(r.backend, r.policy, r.outcome) for r in e.value.results] == [("iscsi", "v12", "completed")]


def test_an_interrupted_demo_shows_the_runs_it_finished(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    p = netswap("demo", "--backend", "iscsi", "--policy", "v12", "--policy", "pfmemalloc", "--out", str(out))
    deadline = time.monotonic() + 120
    while not (out / "iscsi-v12.json").exists():  # the first run finished
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    stdout, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert "Traceback" not in err and stderr_lines(err)[-1].startswith("netswap: interrupted by SIGINT"), err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] == "SIGINT" and not summary["as_expected"]
    assert [(r["backend"], r["policy"], r["outcome"]) for r in summary["runs"]] == [("iscsi", "v12", "completed")]
    assert "iscsi/v12: completed" in stdout
    assert descendants(p.pid) == []


@pytest.mark.parametrize("args,status,says", [
    (["--json", "/nonexistent-dir/r.json"], 2, "--json /nonexistent-dir/r.json: directory /nonexistent-dir does not exist"),
    (["--backend", "nfs-tcp", "--server", "nfs://127.0.0.1/x?nfsport=1&mountport=2"], 1,
     "swapon on nfs://127.0.0.1/x?nfsport=1&mountport=2 failed: server 127.0.0.1: MOUNT failed: connection refused"),
    (["--backend", "nfs-udp", "--server", "nfs://127.0.0.1/x?nfsport=1&mountport=2"], 1,
     "did not answer MOUNT within 10 s"),
    (["--backend", "iscsi", "--server", "iscsi://127.0.0.1:1/iqn.2024-01.org.x:y/0"], 1, "connection refused"),
    (["--backend", "iscsi", "--server", "nfs://127.0.0.1/x"], 2, "--server"),
    (["--backend", "iscsi", "--ram", "3M"], 1, "host.ram is too small"),
    (["--ram", "12Q"], 2, "12Q"),
    (["--json", "/etc/passwd/r.json"], 2, "--json /etc/passwd/r.json: /etc/passwd is not a directory"),
    (["--swap", "0"], 2, "with command-line overrides: host.swap = '0'"),  # no line of a generated text
    (["--duration", "nan"], 2, "'nan' is not a finite number of seconds"),
])
def test_run_errors_are_one_line(args: list[str], status: int, says: str) -> None:
    t0 = time.monotonic()
    p = netswap("run", "--policy", "v12", "-q", *args)
    _, err = p.communicate(timeout=120)
    assert p.returncode == status, err
    lines = stderr_lines(err)
    assert len(lines) == 1 and lines[0].startswith("netswap: error: ") and says in lines[0], err
    assert time.monotonic() - t0 < 60  # bounded: never hangs in swapon
    assert descendants(p.pid) == []


def test_without_cap_net_raw_the_fallback_is_announced_and_recorded(tmp_path: Path) -> None:
    """Root without CAP_NET_RAW (capsh drops it): the capability decides, not the uid."""
    import shutil

    from peers import require_binary, require_root

    require_root()
    capsh = require_binary("capsh")["capsh"]
    out = tmp_path / "r.json"
    cmd = f"{sys.executable} -m emu run --backend iscsi --policy v12 -q --duration 0.05 --json {out}"
    r = subprocess.run([capsh, "--drop=cap_net_raw", "--", "-c", cmd], env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert shutil.which(capsh) and "netswap: no CAP_NET_RAW: background traffic falls back to plain UDP" in r.stderr, r.stderr
    traffic = json.loads(out.read_text())["traffic"]
    assert traffic["generator"].startswith("ordinary UDP socket") and traffic["spoof"] is None, traffic
