"""Refusal of non-loopback destinations, tested so that nothing could leave even if the check were
wrong: socket creation and packet building are made to blow up, so a pass proves that the refusal
came first, before any socket existed."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

import emu.traffic.profiles as profiles
from emu.cli import cli
from emu.traffic import TargetError, TrafficSpec, inject, run

OUTSIDE = ["10.0.0.1", "192.0.2.1", "8.8.8.8", "0.0.0.0", "224.0.0.1", "255.255.255.255", "128.0.0.1", "126.255.255.255"]


class SocketCreated(AssertionError):
    pass


def forbid_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise SocketCreated(f"a socket was created: {args}")

    monkeypatch.setattr(socket, "socket", boom)
    monkeypatch.setattr(socket, "create_connection", boom)
    monkeypatch.setattr(profiles, "_template", boom)  # building packets is also too late


@pytest.fixture
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    forbid_sockets(monkeypatch)
    yield


@pytest.mark.parametrize("host", OUTSIDE)
@pytest.mark.parametrize("profile", ["udp-flood", "frag", "tcp-stream", "mixed"])
def test_run_refuses_before_any_socket(no_sockets: None, host: str, profile: str) -> None:
    with pytest.raises(TargetError, match="only loopback"):
        run(TrafficSpec(profile=profile, host=host, ports=(9000,), size=4000 if profile == "frag" else None))


def test_spoofing_outside_loopback_is_refused_before_any_socket(no_sockets: None) -> None:
    for spoof in ("10.0.0.0/8", "0.0.0.0/0", "126.0.0.0/7"):
        with pytest.raises(TargetError, match="must lie inside 127.0.0.0/8"):
            run(TrafficSpec(ports=(9000,), spoof=spoof))


async def test_trio_inject_refuses_before_any_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_sockets(monkeypatch)  # here, not in a fixture: trio's own wakeup socketpair predates the test
    with pytest.raises(TargetError):
        await inject("udp-flood", "10.1.2.3:53", count=1)
    with pytest.raises(TargetError):
        await inject(TrafficSpec(host="8.8.8.8", ports=(53,)))


@pytest.mark.parametrize("args", [["--to", "8.8.8.8:53"], ["--to", "127.0.0.1:53,10.0.0.1:53"], ["--to", "127.0.0.1:53", "--spoof", "10.0.0.0/8"]])
def test_cli_refuses_with_a_usage_error_naming_the_flag(no_sockets: None, args: list[str]) -> None:
    result = CliRunner().invoke(cli, ["inject", *args, "--count", "1"])
    assert result.exit_code == 2, result.output
    flag = "--spoof" if "--spoof" in args else "--to"
    assert f"Invalid value for {flag}" in result.output and "SocketCreated" not in result.output
