from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from peers import require_root

from emu.cli import cli


def test_inject_json_reports_the_run(udp_receiver) -> None:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(cli, ["inject", "--to", f"127.0.0.1:{udp_receiver.port}", "--no-spoof", "--count", "250", "--rate", "5000", "--size", "32", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["profile"], out["method"], out["sent"], out["errors"], out["stopped"]) == ("udp-flood", "socket", 250, 0, "count")
    assert out["elapsed"] >= 0.0498 and 0 < out["rate"] <= 5000 * 250 / 249 + 1
    assert udp_receiver.settle() == 250 and udp_receiver.sizes == {32: 250}


def test_inject_table_prints_the_achieved_rate(udp_receiver) -> None:  # type: ignore[no-untyped-def]
    require_root()
    result = CliRunner().invoke(cli, ["inject", "--to", f"127.0.0.1:{udp_receiver.port}", "--profile", "frag", "--count", "20", "--rate", "max", "--spoof", "127.25.0.0/16"])
    assert result.exit_code == 0, result.output
    for row in ("datagrams sent", "IP packets sent", "achieved rate", "achieved packet rate", "stopped by"):
        assert row in result.stdout
    assert udp_receiver.settle() == 20


def test_usage_errors_name_the_flag() -> None:
    runner = CliRunner()
    for args, flag in ((["--rate", "fast"], "--rate"), (["--rate", "0"], "--rate"), (["--rate", "-5"], "--rate"), (["--rate", "nan"], "--rate"),
                       (["--to", "127.0.0.1"], "has no port"), (["--duration", "0"], "--duration"), (["--count", "0"], "--count"),
                       (["--fragsize", "1001"], "--fragsize"), (["--profile", "udp-flood", "--incomplete"], "--incomplete"), ([], "--to")):
        result = runner.invoke(cli, ["inject", *(["--to", "127.0.0.1:9"] if args and "--to" not in args else []), *args])
        assert result.exit_code == 2, (args, result.output)
        assert flag in result.output, (args, result.output)
        if args[:1] == ["--rate"] and args[1] != "fast":  # 0 does not mean unlimited: say how to ask for that
            assert "Invalid value for --rate" in result.output and "--rate max" in result.output, result.output


def test_rate_max_is_how_to_ask_for_unpaced(udp_receiver) -> None:  # type: ignore[no-untyped-def]
    help_text = CliRunner().invoke(cli, ["inject", "--help"]).output
    assert "'max' for unpaced" in help_text and "> 0" in help_text
    result = CliRunner().invoke(cli, ["inject", "--to", f"127.0.0.1:{udp_receiver.port}", "--no-spoof", "--rate", "max", "--count", "100", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sent"] == 100 and udp_receiver.settle() == 100


def test_bench_inject_json_has_figures_and_ratios() -> None:
    from emu.traffic.rawsend import have_cap_net_raw

    result = CliRunner().invoke(cli, ["bench", "inject", "--count", "3000", "--size", "100", "--repeat", "1", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    rows = {r["name"]: r for r in (out if isinstance(out, list) else [out])}
    for r in rows.values():
        assert r["figure"] > 0 and r["baseline"] > 0 and abs(r["ratio"] - r["figure"] / r["baseline"]) < 1e-9
    udp = [r for name, r in rows.items() if "udp-flood" in name]
    assert udp and {r["baseline_name"] for r in udp} == {"plain sendto loop, 100 B datagrams"}
    frag = [r for name, r in rows.items() if "frag" in name]
    if not have_cap_net_raw():
        assert not frag
        return
    # frag is compared with sendto() of datagrams of its own size, not with the udp-flood loop;
    # as datagrams/s, and as IP packets/s (ours: fragments; the baseline's: the kernel's).
    dgrams, packets = sorted(frag, key=lambda r: r["unit"])
    assert (dgrams["unit"], packets["unit"]) == ("datagrams/s", "packets/s")
    assert dgrams["baseline"] != udp[0]["baseline"] and dgrams["extra"]["size"] == 4000
    assert all("sendto of 4000 B datagrams" in r["baseline_name"] for r in frag)
    assert abs(packets["figure"] / dgrams["figure"] - 3) < 1e-6  # 4008 UDP bytes in 1480-byte pieces
    if dgrams["extra"]["netns"]:  # the kernel really fragmented the baseline: its own counter says so
        assert dgrams["extra"]["baseline_fragments_per_datagram"] == 3 and "kernel-fragmented into 3" in dgrams["baseline_name"]
        assert abs(packets["baseline"] - 3 * dgrams["baseline"]) < 1e-6
    else:
        assert "NOT fragmented" in dgrams["baseline_name"]


@pytest.mark.parametrize("args, flag", [(["--size", "0"], "'--size'"), (["--size", "70000"], "'--size'"), (["--size", "x"], "'--size'"),
                                        (["--count", "0"], "'--count'"), (["--repeat", "0"], "'--repeat'"), (["--repeat", "-1"], "'--repeat'")])
def test_bench_inject_usage_errors_name_the_flag(args: list[str], flag: str) -> None:
    result = CliRunner().invoke(cli, ["bench", "inject", *args])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {flag}" in result.output and "Traceback" not in result.output
    other = {"'--count'", "'--repeat'", "'--size'"} - {flag}
    assert not any(o in result.output for o in other)  # it names the wrong flag, and only that one
