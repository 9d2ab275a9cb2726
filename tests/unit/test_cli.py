from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from emu.cli import cli


def test_help_lists_every_subcommand() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("demo", "run", "reserve", "inject", "serve", "bench"):
        assert f"  {name}" in result.output


def test_every_lazy_subcommand_imports_and_has_help() -> None:
    runner = CliRunner()
    for group, names in (("serve", ["nfs", "iscsi"]), ("bench", ["swap-local", "swap", "rx", "inject", "nfs", "iscsi"]), (None, ["demo", "run", "reserve", "inject"])):
        for name in names:
            args = ([group] if group else []) + [name, "--help"]
            result = runner.invoke(cli, args)
            assert result.exit_code == 0, (args, result.output, result.exception)
            assert "Usage:" in result.output


def test_unknown_subcommand_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code == 2


def test_python_dash_m_emu() -> None:
    out = subprocess.run([sys.executable, "-m", "emu", "--help"], capture_output=True, text=True, check=True)
    assert "netswap" in out.stdout


def test_bench_nfs_sizes_are_checked_before_anything_runs() -> None:
    for option, value in (("--size", "12Q"), ("--size", "0"), ("--udp-size", "12Q")):
        result = CliRunner().invoke(cli, ["bench", "nfs", option, value])
        assert result.exit_code == 2 and option in result.output, result.output


def test_bench_iscsi_refuses_runs_too_short_for_iscsi_perf() -> None:
    """Split over the rounds, each run must last long enough for iscsi-perf to print an average
    (it printed nothing for 0.33 s runs, and the bench failed after starting both targets)."""
    result = CliRunner().invoke(cli, ["bench", "iscsi", "--seconds", "3", "--rounds", "3"])
    assert result.exit_code == 2 and "--seconds" in result.output and "--seconds 6" in result.output, result.output
