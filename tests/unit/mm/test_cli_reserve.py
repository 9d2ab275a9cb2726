"""`netswap reserve` and `netswap bench swap-local` from the command line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from emu.cli import cli
from reserve_sample import PUBLISHED


def run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return r.exit_code, r.output


def test_defaults_reproduce_the_published_sample() -> None:
    code, out = run("reserve")
    assert code == 0
    assert PUBLISHED in out
    assert "--dst-entry-size 320" in out and "--ipfrag-high-thresh 262144" in out  # inputs named
    code, out = run("reserve", "--ram", "128M", "--nfs-swappers", "1", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["reserve_info"] == PUBLISHED
    assert d["total_kbytes"] == 6232 and d["route_hash"]["buckets"] == 1024
    assert [n["name"] for n in d["nodes"]][:3] == ["total reserve", "total network reserve", "network TX reserve"]


def test_every_input_is_a_flag() -> None:
    code, out = run("reserve", "--ram", "16M", "--route-max-size", "1000", "--dst-entry-size", "384",
                    "--ipfrag-high-thresh", "65536", "--nfs-swappers", "2", "--iscsi-sessions", "1",
                    "--rpc-slot-table", "16", "--page-size", "8192", "--json")
    assert code == 0
    d = json.loads(out)
    nodes = {n["name"]: n for n in d["nodes"]}
    assert nodes["IPv4 route cache"]["limit"] == 1000
    assert nodes["IPv4 fragment cache"]["pages"] == 16  # ceil(2*65536/8192)
    # 2 x (kmalloc estimate of 16 rpc_rqst: size-512 is on-slab in 8 KiB pages, 15 per slab ->
    # P = 2, 2 + 1 + ilog2(2) = 4; plus TX_RESERVE_PAGES 16) + 1 x TX_RESERVE_PAGES 16
    assert nodes["protocol TX pages"]["pages"] == 2 * (4 + 16) + 16
    assert d["inputs"]["route_max_size_derived"] is False


def test_policy_views() -> None:
    code, out = run("reserve", "--ram", "16M", "--policy", "pfmemalloc", "--json")
    assert code == 0 and json.loads(out)["policy_reserve_pages"] == 128  # the min watermark
    code, out = run("reserve", "--ram", "16M", "--policy", "none", "--json")
    assert json.loads(out)["policy_reserve_pages"] == 0


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--ram", "0"], "--ram"),
        (["--ram", "-16M"], "--ram"),
        (["--ram", "lots"], "--ram"),
        (["--ram", "2M", "--route-max-size", "100000"], "--ram"),
        (["--page-size", "1000"], "--page-size"),
        (["--nfs-swappers", "-1"], "--nfs-swappers"),
        (["--route-max-size", "-5"], "--route-max-size"),
        (["--dst-entry-size", "0"], "--dst-entry-size"),
        (["--rpc-slot-table", "0"], "--rpc-slot-table"),  # (no slot: the transport could send nothing)
        (["--rpc-slot-table", "129"], "--rpc-slot-table"),
        (["--policy", "v13"], "--policy"),
        (["--min-free-kbytes", "999999"], "--min-free-kbytes"),
    ],
)
def test_impossible_inputs_exit_2_naming_the_flag(args: list[str], flag: str) -> None:
    r = CliRunner().invoke(cli, ["reserve", *args])
    assert r.exit_code == 2, r.output
    assert flag in r.output


def test_bench_swap_local_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    code, out = run("bench", "swap-local", "--pages", "600", "--ram", "512K", "--dir", str(tmp_path), "--json")
    assert code == 0
    d = json.loads(out)
    assert {"figure", "baseline", "ratio"} <= set(d)
    assert d["figure"] > 0 and d["baseline"] > 0 and d["ratio"] == pytest.approx(d["figure"] / d["baseline"])
    assert d["extra"]["verify_errors"] == 0 and d["extra"]["pswpout"] >= 600 - 128
    r = CliRunner().invoke(cli, ["bench", "swap-local", "--ram", "0"])
    assert r.exit_code == 2 and "--ram" in r.output
    # Pages that would stay resident measure no swap: refused, naming the flag.
    r = CliRunner().invoke(cli, ["bench", "swap-local", "--pages", "100", "--ram", "8M"])
    assert r.exit_code == 2 and "--pages" in r.output
