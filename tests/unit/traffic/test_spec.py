from __future__ import annotations

import tomllib

import pytest

from emu.traffic.api import make_spec
from emu.traffic.profiles import Profile
from emu.traffic.spec import SpecError, TrafficSpec
from emu.traffic.target import TargetError


def test_a_scenario_toml_table_maps_onto_a_spec() -> None:
    table = tomllib.loads(
        """
        [traffic]
        profile = "frag"
        to = "127.0.0.1:2049,2050"
        rate = 20000
        duration = 3
        count = 5000
        spoof = "127.128.0.0/16"
        size = 8000
        incomplete = true
        """
    )["traffic"]
    spec = TrafficSpec.from_mapping(table)
    assert spec.profile is Profile.FRAG and spec.ports == (2049, 2050) and spec.host == "127.0.0.1"
    assert (spec.rate, spec.duration, spec.count, spec.spoof, spec.size, spec.incomplete) == (20000.0, 3.0, 5000, "127.128.0.0/16", 8000, True)
    tcp = TrafficSpec.from_mapping({"profile": "tcp-stream", "ports": [3260], "connections": 32, "spoof": False})
    assert tcp.spoof is None and tcp.connections == 32 and tcp.size == 16384 and not tcp.needs_raw


def test_unknown_settings_are_named() -> None:
    with pytest.raises(SpecError, match="unknown traffic setting 'speed'"):
        TrafficSpec.from_mapping({"ports": [1], "speed": 3})


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"rate": 0}, "rate"),
        ({"rate": -5}, "rate"),
        ({"duration": 0}, "duration"),
        ({"duration": 7200}, "duration"),
        ({"count": 0}, "count"),
        ({"size": 70000}, "size"),
        ({"profile": "frag", "size": 1000}, "size"),
        ({"fragsize": 1001}, "fragsize"),
        ({"connections": 0}, "connections"),
        ({"profile": "nope"}, "profile"),
        ({"incomplete": True}, "incomplete"),
        ({"method": "socket"}, "spoof"),
        ({"profile": "frag", "method": "socket"}, "method"),
        ({"ports": ()}, "ports"),
        ({"host": "192.168.1.1"}, "host"),
        ({"spoof": "10.0.0.0/8"}, "spoof"),
    ],
)
def test_out_of_range_settings_are_refused_naming_the_setting(fields: dict[str, object], param: str) -> None:
    with pytest.raises((SpecError, TargetError)) as info:
        TrafficSpec(ports=(9000,)).replace(**fields).validate()
    assert info.value.param == param  # type: ignore[union-attr]


def test_which_specs_need_a_raw_socket() -> None:
    base = TrafficSpec(ports=(9,))
    assert base.needs_raw  # spoofed sources
    assert not base.replace(spoof=None).needs_raw  # the unprivileged fallback
    assert base.replace(spoof=None, method="raw").needs_raw
    assert base.replace(profile="frag").needs_raw and base.replace(profile="mixed", spoof=None).needs_raw
    assert not base.replace(profile="tcp-stream").needs_raw
    fb = base.replace(profile="frag", incomplete=True, size=9000).without_raw()
    assert (fb.profile, fb.spoof, fb.method, fb.incomplete, fb.size, fb.needs_raw) == (Profile.UDP_FLOOD, None, "socket", False, 512, False)


def test_make_spec_accepts_a_profile_and_a_destination() -> None:
    assert make_spec("udp-flood", 9000).ports == (9000,)
    assert make_spec("udp-flood", [1, 2, 2]).ports == (1, 2)
    assert make_spec(TrafficSpec(), "127.1.2.3:5,6", rate=None).targets[1].addr == ("127.1.2.3", 6)
    with pytest.raises(TargetError, match="one host"):
        make_spec("udp-flood", "127.0.0.1:5,127.0.0.2:6")


def test_a_table_without_ports_takes_them_later() -> None:
    spec = TrafficSpec.from_mapping({"profile": "udp-flood", "rate": 1000})
    assert spec.ports == ()
    assert spec.replace(ports=(4000,)).validate().ports == (4000,)
    assert TrafficSpec.from_mapping({"rate": 1000}, ports=(7,)).ports == (7,)
    with pytest.raises(SpecError):  # the rest is still checked up front
        TrafficSpec.from_mapping({"rate": -1})
    again = TrafficSpec.from_mapping(make_spec("frag", 9, incomplete=True).to_mapping())
    assert again == make_spec("frag", 9, incomplete=True)
