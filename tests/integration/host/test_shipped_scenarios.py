"""Every shipped example scenario parses, validates, round-trips and is listed by the CLI; the
control run (no traffic) completes end to end with every page verified."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from emu import scenario as scen
from emu.host import run_host
from emu.host.servers import local_server

EXAMPLES = ("demo", "nfs-tcp", "iscsi-random", "frag-storm", "quiet")


def test_the_examples_are_shipped() -> None:
    assert set(EXAMPLES) <= set(scen.shipped())


@pytest.mark.parametrize("name", scen.shipped())
def test_shipped_scenario_is_valid(name: str, tmp_path: Path) -> None:
    sc = scen.load(name)
    assert sc.name == name and sc.description, "each example says what it shows"
    assert sc.backend in scen.BACKENDS and sc.policy in scen.POLICIES
    assert sc.workload.working_set > sc.host.ram, "an example that does not swap shows nothing"
    # The file itself (by path, as `netswap run emu/scenarios/X.toml` loads it) gives the same.
    path = resources.files("emu").joinpath("scenarios", f"{name}.toml")
    assert scen.loads(path.read_text(), source=str(path)).to_dict() == sc.to_dict()
    # Lossless round trip through --print-scenario's writer.
    p = tmp_path / "x.toml"
    p.write_text(scen.dumps(sc))
    assert scen.load(p).to_dict() == sc.to_dict()


def test_list_scenarios_names_every_example() -> None:
    out = subprocess.run([sys.executable, "-m", "emu", "run", "--list-scenarios"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    for name in EXAMPLES:
        assert f"{name}: " in out
    helptext = subprocess.run([sys.executable, "-m", "emu", "run", "--help"], capture_output=True,
                              text=True, timeout=60, check=True).stdout
    assert all(name in helptext for name in EXAMPLES)


def test_examples_mean_what_they_say() -> None:
    assert scen.load("nfs-tcp").backend == "nfs-tcp"
    assert scen.load("iscsi-random").backend == "iscsi" and scen.load("iscsi-random").workload.kind == "random"
    frag = scen.load("frag-storm")
    assert frag.traffic.profile == "frag" and frag.traffic.frag_size + 28 > 2 * frag.host.mtu
    quiet = scen.load("quiet")
    assert quiet.traffic.profile == "none"


def test_quiet_control_run_completes_under_none() -> None:
    sc = scen.load("quiet").replace(policy="none")
    with local_server(sc.backend, sc.host.swap) as sp:
        res = run_host(sc, sp.server)
    assert res.outcome == "completed", (res.outcome, res.report[:2000])
    assert res.pages_swapped_out > 0 and res.pages_swapped_in > 0
    assert res.integrity["mismatches"] == 0
    assert res.integrity["verified"] >= sc.workload.working_set // sc.host.page_size
    assert res.drops.get("rx_nomem", 0) == 0
