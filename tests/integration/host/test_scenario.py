"""Scenario files: the shipped ones load, a round trip is lossless, bad files are named precisely."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from emu import scenario as scen


def test_shipped_scenarios_load_and_default_is_demo() -> None:
    names = scen.shipped()
    assert "demo" in names
    for name in names:
        sc = scen.load(name)
        assert sc.name == name
    d = scen.default()
    assert d.name == "demo"
    # the demo's own workload and traffic: a working set larger than RAM, traffic on
    assert d.workload.working_set > d.host.ram
    assert d.traffic.profile != "none" and d.traffic.apps > 0


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    sc = scen.default().replace(backend="iscsi", policy="v12", server="iscsi://127.0.0.1:3261/iqn.2024-01.test:tgt/1")
    sc.host.ram = 8 << 20
    sc.workload.kind = "random"
    sc.traffic.rate = 1234
    sc.watchdog.stall = 2.5
    p = tmp_path / "s.toml"
    p.write_text(scen.dumps(sc))
    back = scen.load(p)
    assert back.to_dict() == sc.to_dict()
    assert back.source == str(p)


@pytest.mark.parametrize(
    ("body", "line", "key", "value"),
    [
        ('name = "x"\n[host]\nram = "12Q"\n', 3, "host.ram", "12Q"),
        ('[workload]\nprocesses = 2\nkind = "zigzag"\n', 3, "workload.kind", "zigzag"),
        ('[traffic]\n\nspoof = "10.0.0.0/8"\n', 3, "traffic.spoof", "10.0.0.0/8"),
        ('policy = "v13"\n', 1, "policy", "v13"),
        ('[host]\nbogus = 1\n', 2, "host.bogus", "1"),
        ('[watchdog]\nstall = -1\n', 2, "watchdog.stall", "-1"),
        ('[watchdog]\nstall = nan\n', 2, "watchdog.stall", "nan"),  # NaN fails every bound test
        ('[traffic]\napp_period = inf\n', 2, "traffic.app_period", "inf"),
        ('[host]\nram = "12M"\nmin_free_kbytes = 9000\n', 3, "host.min_free_kbytes", "9000"),
        ('[traffic]\nrate = -5\n', 2, "traffic.rate", "-5"),
        ('[traffic]\napps = 2\napp_period = "soon"\n', 3, "traffic.app_period", "soon"),
        ('[traffic]\napp_period = 0\n', 2, "traffic.app_period", "0"),
        ('[costs]\npeer_rtt = 0\n', 2, "costs.peer_rtt", "0"),
        ('[costs]\n# a comment\nrx_frame = -1e-6\n', 3, "costs.rx_frame", "-1e-06"),
        ('[costs]\nlink_rate = "fast"\n', 2, "costs.link_rate", "fast"),
        ('[costs]\npage_copy = 1e-6\n', 2, "costs.page_copy", "1e-06"),
        ('[costs]\nswap_io = nan\n', 2, "costs.swap_io", "nan"),
    ],
)
def test_bad_file_names_file_line_key_and_value(tmp_path: Path, body: str, line: int, key: str, value: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(body)
    with pytest.raises(scen.ScenarioError) as ei:
        scen.load(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:{line}: {key} = "), msg
    assert value in msg
    assert ei.value.line == line and ei.value.key == key


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "broken.toml"
    p.write_text("[host\nram = 1\n")
    with pytest.raises(scen.ScenarioError, match=r"broken\.toml:1: not valid TOML"):
        scen.load(p)
    with pytest.raises(scen.ScenarioError, match="cannot read"):
        scen.load(tmp_path / "nope.toml")


def test_run_rejects_bad_scenario_with_exit_2(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text('[workload]\nworking_set = "lots"\n')
    r = subprocess.run([sys.executable, "-m", "emu", "run", str(p)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert f"{p}:2: workload.working_set = 'lots'" in r.stderr.replace("\n", "")


def test_run_usage_errors_name_the_flag(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "emu", "run", "--ram", "lots"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--ram" in r.stderr
    r = subprocess.run([sys.executable, "-m", "emu", "run", "--backend", "nfs-udp", "--server", "iscsi://127.0.0.1/iqn.x:y/0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--server" in r.stderr
    r = subprocess.run([sys.executable, "-m", "emu", "run", "--policy", "none", "--print-scenario"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert scen.loads(r.stdout).policy == "none"


def test_costs_section_overrides_the_table_and_round_trips(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[costs]\npeer_rtt = 0.0005  # a slower LAN\nlink_rate = 1e8\n")
    sc = scen.load(p)
    assert sc.costs.peer_rtt == 0.0005 and sc.costs.link_rate == 1e8
    assert sc.costs.rx_frame == scen.Costs().rx_frame  # the rest keep their defaults
    q = tmp_path / "d.toml"
    q.write_text(scen.dumps(sc))
    assert scen.load(q).to_dict() == sc.to_dict()
    assert "[costs]" in q.read_text() and "peer_rtt = 0.0005" in q.read_text()


def test_unknown_costs_key_lists_the_known_ones(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[costs]\npage_copy = 1e-6\n")
    with pytest.raises(scen.ScenarioError) as ei:
        scen.load(p)
    assert "unknown key" in str(ei.value) and "copy_byte" in str(ei.value)


@pytest.mark.parametrize("body", ['[costs]\npeer_rtt = 0\n', '[costs]\nbogus = 1\n', '[traffic]\nrate = -1\n'])
def test_run_refuses_bad_costs_and_rates_with_exit_2(tmp_path: Path, body: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(body)
    r = subprocess.run([sys.executable, "-m", "emu", "run", str(p)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"{p}:2: " in r.stderr.replace("\n", "")


def test_unknown_name_lists_the_shipped_scenarios_and_unknown_section_has_its_line(tmp_path: Path) -> None:
    with pytest.raises(scen.ScenarioError) as ei:
        scen.load("no-such-scenario")
    assert "cannot read" in str(ei.value) and "shipped scenarios: " in str(ei.value) and "demo" in str(ei.value)
    p = tmp_path / "typo.toml"
    p.write_text('name = "x"\n\n[hots]\nram = "8M"\n')
    with pytest.raises(scen.ScenarioError) as ei:
        scen.load(p)
    assert str(ei.value).startswith(f"{p}:3: hots = "), str(ei.value)
