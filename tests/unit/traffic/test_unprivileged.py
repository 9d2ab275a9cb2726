"""Without CAP_NET_RAW: say so, say how to run instead, and offer the ordinary-socket fallback.

Forced two ways, so these run whoever runs the tests: by telling the injector it lacks the
capability, and for real by running the CLI as user nobody (when the tests run as root) or as
the current user (when they don't)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

import emu.traffic.rawsend as rawsend
from emu.cli import cli
from emu.traffic import NeedsRawError, TrafficSpec, inject, run


@pytest.fixture
def no_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rawsend, "have_cap_net_raw", lambda: False)


@pytest.mark.parametrize("profile", ["udp-flood", "frag", "mixed"])
def test_needs_raw_says_how_to_run_instead(no_cap: None, udp_receiver, profile: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NeedsRawError) as info:
        run(TrafficSpec(profile=profile, ports=(udp_receiver.port,), count=10))
    text = str(info.value)
    assert "root or CAP_NET_RAW" in text and "sudo" in text and "--profile udp-flood --no-spoof" in text
    assert udp_receiver.settle(quiet=0.1) == 0


def test_fallback_runs_udp_flood_without_spoofing(no_cap: None, udp_receiver) -> None:  # type: ignore[no-untyped-def]
    stats = run(TrafficSpec(profile="frag", ports=(udp_receiver.port,), count=500, rate=None, incomplete=True, size=4000), fallback=True)
    assert (stats.profile, stats.method, stats.sent) == ("udp-flood", "socket", 500)
    assert "no CAP_NET_RAW" in stats.notes[0]
    assert udp_receiver.settle() == 500 and set(udp_receiver.sources) == {"127.0.0.1"}
    assert udp_receiver.sizes == {512: 500}


async def test_trio_fallback(no_cap: None, udp_receiver) -> None:  # type: ignore[no-untyped-def]
    stats = await inject("udp-flood", udp_receiver.port, count=100, rate=None, fallback=True)
    assert stats.method == "socket" and stats.sent == 100 and stats.notes
    assert udp_receiver.settle() == 100


def test_cli_without_cap_refuses_unless_told_to_fall_back(no_cap: None, udp_receiver) -> None:  # type: ignore[no-untyped-def]
    runner = CliRunner()
    to = f"127.0.0.1:{udp_receiver.port}"
    refused = runner.invoke(cli, ["inject", "--to", to, "--count", "10", "--no-fallback"])
    assert refused.exit_code == 1 and "CAP_NET_RAW" in refused.output and "--no-spoof" in refused.output
    ok = runner.invoke(cli, ["inject", "--to", to, "--count", "50", "--rate", "max", "--fallback", "--json"])
    assert ok.exit_code == 0, ok.output
    result = json.loads(ok.stdout[ok.stdout.index("{"):])
    assert (result["method"], result["sent"]) == ("socket", 50)
    assert udp_receiver.settle() == 50  # the refused run sent nothing


def _unprivileged() -> list[str]:
    """A command prefix that runs a program without CAP_NET_RAW: as user nobody if nobody can run
    this interpreter, else as root with every capability dropped from the bounding set."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("running as root, and setpriv (util-linux) is missing to drop privileges")
    nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
    probe = subprocess.run([*nobody, sys.executable, "-c", "import emu.traffic"], capture_output=True, timeout=30, cwd="/")
    if probe.returncode == 0:
        return nobody
    return [setpriv, "--inh-caps=-all", "--bounding-set=-all"]


def test_really_unprivileged_cli(udp_receiver) -> None:  # type: ignore[no-untyped-def]
    to = f"127.0.0.1:{udp_receiver.port}"
    argv = [*_unprivileged(), sys.executable, "-m", "emu", "inject", "--to", to]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/tmp"}
    refused = subprocess.run([*argv, "--count", "10"], capture_output=True, text=True, timeout=30, env=env, stdin=subprocess.DEVNULL)
    assert refused.returncode == 1, refused.stderr
    assert "CAP_NET_RAW" in refused.stderr and "--profile udp-flood --no-spoof" in refused.stderr
    ok = subprocess.run([*argv, "--no-spoof", "--count", "300", "--rate", "max", "--json"], capture_output=True, text=True, timeout=30, env=env, stdin=subprocess.DEVNULL)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["sent"] == 300
    assert udp_receiver.settle() == 300 and set(udp_receiver.sources) == {"127.0.0.1"}
