"""Scenario files: one emulated host, its workload, its background traffic, in TOML.

A scenario says everything a run needs except what the command line overrides (backend, policy,
server). `load()` validates every key and value; a bad file raises `ScenarioError` naming the
file, the line, the key and the value, and what was expected. `dumps()` writes a scenario back
as TOML that `loads()` reads to the same object (the round trip the tests check).

Sizes are written like the kernel's command line: `16M`, `512K`, `1G`, or a plain byte count.
Every duration and rate is in *emulated* seconds (emu.kernel.clock): `rate = 10000` is 10,000
messages per emulated second on any machine.  `[costs]` overrides the cost table of the model
(emu.kernel.cpu.Costs): how long the host's work takes, and the network's rate and latency.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from emu.kernel.cpu import Costs
from emu.kernel.policy import Policy
from emu.util.units import format_size, parse_size

BACKENDS = ("nfs-udp", "nfs-tcp", "iscsi")
POLICIES = tuple(p.value for p in Policy)  # none, v12, pfmemalloc: the names TOML and the CLI use
WORKLOADS = ("sequential", "random", "hotcold")
TRAFFIC_PROFILES = ("none", "udp-flood", "frag", "mixed")
CLUSTER_TRAFFIC = ("split", "each")
MAX_HOSTS = 64  # 127.0.1.1 .. 127.0.1.64
DEFAULT_SCENARIO = "demo"

class ScenarioError(ValueError):
    """A bad scenario: names the file, the line, the key and the value."""

    def __init__(self, source: str, line: int | None, key: str, value: object, expected: str) -> None:
        self.source, self.line, self.key, self.value, self.expected = source, line, key, value, expected
        where = f"{source}:{line}" if line else source
        if key.startswith("<"):
            super().__init__(f"{where}: {expected}")
        else:
            super().__init__(f"{where}: {key} = {value!r}: {expected}")


# --- the schema -------------------------------------------------------------------------------
# Each field's metadata: kind ("size", "int", "float", "str", "bool", "choice", "net"), bounds or
# choices, and a one-line help used in error messages and in `dumps()` comments.


def _f(default: Any, kind: str, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"kind": kind, "help": help, **meta})


@dataclass
class HostSection:
    ram: int = _f(12 << 20, "size", "emulated RAM", min=1 << 20, max=1 << 30)
    page_size: int = _f(4096, "int", "page size in bytes", choices=(4096,))
    min_free_kbytes: int = _f(0, "int", "vm.min_free_kbytes (0 = Linux's default formula)", min=0, max=65536)
    swap: int = _f(64 << 20, "size", "swap size", min=1 << 20, max=4 << 30)
    swap_cluster: int = _f(1, "int", "pages per swap write I/O (1: swap_writepage, one page per WRITE)", min=1, max=64)
    mtu: int = _f(1500, "int", "NIC MTU", min=576, max=65535)
    route_max_size: int = _f(0, "int", "net.ipv4.route.max_size (0 = derived from RAM)", min=0, max=1 << 24)
    # The stack's defaults, written out (a scenario may not import emu.net): emu.net.ipfrag's
    # IPFRAG_HIGH_THRESH, IPFRAG_LOW_THRESH, IPFRAG_TIME and emu.net.sock's RMEM_DEFAULT;
    # tests/unit/net/test_scenario_defaults.py keeps them equal.
    ipfrag_high_thresh: int = _f(262144, "int", "net.ipv4.ipfrag_high_thresh in bytes", min=4096, max=1 << 30)
    ipfrag_low_thresh: int = _f(196608, "int", "net.ipv4.ipfrag_low_thresh in bytes", min=0, max=1 << 30)
    ipfrag_time: float = _f(30.0, "float", "net.ipv4.ipfrag_time in seconds", min=0.1, max=3600.0)
    rmem_default: int = _f(212992, "int", "net.core.rmem_default (socket receive buffer)", min=2048, max=1 << 30)
    reserve_scale: float = _f(1.0, "float", "v12: the emergency pool is this factor of what the reserve tree asks for (below 1: smaller than writeout needs)", min=0.0, max=4.0)


@dataclass
class WorkloadSection:
    kind: str = _f("hotcold", "choice", "access pattern", choices=WORKLOADS)
    processes: int = _f(2, "int", "number of workload processes", min=1, max=64)
    working_set: int = _f(20 << 20, "size", "anonymous working set of all workload processes together", min=4096, max=4 << 30)
    passes: int = _f(3, "int", "passes over the working set (each pass rewrites every page it touches)", min=1, max=1000)
    hot_fraction: float = _f(0.2, "float", "hotcold: fraction of pages that are hot", min=0.0, max=1.0)
    hot_probability: float = _f(0.8, "float", "hotcold: probability that an access goes to a hot page", min=0.0, max=1.0)
    write_fraction: float = _f(1.0, "float", "fraction of accesses that write (the rest read and verify)", min=0.0, max=1.0)
    seed: int = _f(1, "int", "random seed of the access pattern", min=0, max=2**31)


@dataclass
class TrafficSection:
    profile: str = _f("mixed", "choice", "background traffic profile", choices=TRAFFIC_PROFILES)
    apps: int = _f(4, "int", "application processes owning the sockets that receive it", min=0, max=256)
    app_pages: int = _f(8, "int", "anonymous pages of each application process", min=1, max=4096)
    app_touch: int = _f(4, "int", "pages of its heap an application looks at (round robin) before each read", min=1, max=4096)
    app_period: float = _f(0.05, "float", "seconds between an application's reads of its socket", min=0.001, max=60.0)
    rate: int = _f(6000, "int", "messages (datagrams) per second", min=1, max=1_000_000)
    size: int = _f(1024, "int", "UDP payload bytes (udp-flood)", min=1, max=65507)
    frag_size: int = _f(4000, "int", "UDP payload bytes of fragmented datagrams (frag)", min=1, max=65507)
    spoof: str = _f("127.64.0.0/16", "net", "spoofed source range inside 127.0.0.0/8 (root only)")
    distinct: int = _f(4096, "int", "distinct spoofed sources (each one a route cache entry)", min=1, max=65536)
    start_after: float = _f(0.0, "float", "seconds after the workload starts that the applications start listening (0: when free memory first reaches the low watermark)", min=0.0, max=3600.0)
    duration: float = _f(60.0, "float", "seconds the traffic lasts at most", min=0.1, max=3600.0)


@dataclass
class WatchdogSection:
    stall: float = _f(2.0, "float", "seconds with swap I/O in flight, tasks blocked and no progress before a deadlock is declared", min=0.01, max=600.0)
    livelock_window: float = _f(2.0, "float", "seconds over which progress is measured for a livelock", min=0.01, max=3600.0)
    livelock_fraction: float = _f(0.05, "float", "a livelock is progress below this fraction of the reserve policy's rate, with swap replies dropped", min=0.0001, max=1.0)
    timeout: float = _f(60.0, "float", "seconds a run may last at most (then: timeout, an error)", min=0.01, max=86400.0)
    sample: float = _f(0.01, "float", "seconds between timeline samples and watchdog checks", min=0.001, max=10.0)


VERDICTS = ("completed", "deadlock", "livelock", "stuck", "any")  # stuck: deadlock or livelock


@dataclass
class ExpectSection:
    """The verdict each policy should reach on this scenario (`netswap demo` checks them)."""

    none: str = _f("stuck", "choice", "expected verdict under none (stuck: deadlock or livelock)", choices=VERDICTS)
    v12: str = _f("completed", "choice", "expected verdict under v12", choices=VERDICTS)
    pfmemalloc: str = _f("completed", "choice", "expected verdict under pfmemalloc", choices=VERDICTS)

    def wants(self, policy: Policy) -> str:
        """The verdict expected under `policy`."""
        want: str = getattr(self, policy.value)
        return want

    def allows(self, policy: Policy, outcome: str) -> bool:
        want = self.wants(policy)
        return want == "any" or outcome == want or (want == "stuck" and outcome in ("deadlock", "livelock"))


@dataclass
class ClusterSection:
    hosts: int = _f(1, "int", "emulated hosts, each its own process and loopback address (127.0.1.N), sharing one server", min=1, max=MAX_HOSTS)
    traffic: str = _f("split", "choice", "split: traffic.rate is the cluster's total, shared evenly by the hosts; each: every host gets traffic.rate", choices=CLUSTER_TRAFFIC)


@dataclass
class Scenario:
    name: str = "demo"
    description: str = ""
    backend: str = "nfs-udp"
    policy: Policy = Policy.NONE
    server: str = ""
    host: HostSection = field(default_factory=HostSection)
    workload: WorkloadSection = field(default_factory=WorkloadSection)
    traffic: TrafficSection = field(default_factory=TrafficSection)
    watchdog: WatchdogSection = field(default_factory=WatchdogSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    expect: ExpectSection = field(default_factory=ExpectSection)
    costs: Costs = field(default_factory=Costs)
    source: str = "<defaults>"

    SECTIONS = ("host", "workload", "traffic", "watchdog", "cluster", "expect")

    def __post_init__(self) -> None:
        self.policy = Policy(self.policy)  # `replace(policy="v12")`: a name from the CLI or a sweep

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "description": self.description, "backend": self.backend,
                             "policy": self.policy.value, "server": self.server}
        for s in self.SECTIONS:
            d[s] = dataclasses.asdict(getattr(self, s))
        d["costs"] = self.costs.to_json()
        return d

    def replace(self, **changes: Any) -> "Scenario":
        return dataclasses.replace(self, **changes)


# --- loading ----------------------------------------------------------------------------------


def _line_of(text: str, section: str | None, key: str) -> int | None:
    """The line where `key` is assigned inside `[section]` (None: top level)."""
    current: str | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("[") and not line.startswith("[["):
            current = line.strip("[] \t").split("#")[0].strip()
            continue
        if current == section and re.match(rf"^\"?{re.escape(key)}\"?\s*=", line):
            return n
    return None


def _section_line(text: str, section: str) -> int | None:
    for n, raw in enumerate(text.splitlines(), 1):
        if raw.strip().startswith(f"[{section}]"):
            return n
    return None


def _convert(value: Any, meta: dict[str, Any]) -> Any:
    kind = meta["kind"]
    v: Any
    if kind == "size":
        try:
            v = parse_size(value)
        except ValueError as e:
            raise ValueError(str(e).removeprefix("expected ")) from None
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("an integer")
        v = value
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("a number")
        v = float(value)
        if not math.isfinite(v):  # (NaN passes every < and > test below)
            raise ValueError("a finite number")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ValueError("true or false")
        v = value
    elif kind in ("str", "choice", "net"):
        if not isinstance(value, str):
            raise ValueError("a string")
        v = value
    else:  # pragma: no cover - schema bug
        raise AssertionError(kind)
    if "choices" in meta and v not in meta["choices"]:
        raise ValueError("one of " + ", ".join(str(c) for c in meta["choices"]))
    if "min" in meta and v < meta["min"]:
        raise ValueError(f"at least {format_size(meta['min']) if kind == 'size' else meta['min']}")
    if "max" in meta and v > meta["max"]:
        raise ValueError(f"at most {format_size(meta['max']) if kind == 'size' else meta['max']}")
    if kind == "net":
        try:
            net = ipaddress.ip_network(v, strict=False)
        except ValueError as e:
            raise ValueError(f"a network like 127.64.0.0/16 ({e})") from None
        if not net.subnet_of(ipaddress.ip_network("127.0.0.0/8")):  # type: ignore[arg-type]
            raise ValueError("a range inside 127.0.0.0/8 (traffic stays on loopback)")
    return v


def loads(text: str, source: str = "<string>") -> Scenario:
    """Parse and validate a scenario. Unset keys take the defaults of the demo scenario."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise ScenarioError(source, int(m.group(1)) if m else None, "<toml>", None, f"not valid TOML: {e}") from None
    sc = Scenario(source=source)
    top = {"name": ("str", None), "description": ("str", None), "backend": ("choice", BACKENDS),
           "policy": ("choice", POLICIES), "server": ("str", None)}
    for key, value in data.items():
        if key == "costs":
            sc.costs = _costs(value, text, source)
        elif key in Scenario.SECTIONS:
            if not isinstance(value, dict):
                raise ScenarioError(source, _line_of(text, None, key), key, value, "a table [" + key + "]")
            cls = type(getattr(sc, key))
            known = {f.name: f for f in fields(cls)}
            section_obj = cls()
            for k, v in value.items():
                dotted = f"{key}.{k}"
                if k not in known:
                    raise ScenarioError(source, _line_of(text, key, k) or _section_line(text, key), dotted, v,
                                        "unknown key; known keys: " + ", ".join(known))
                try:
                    setattr(section_obj, k, _convert(v, dict(known[k].metadata)))
                except ValueError as e:
                    raise ScenarioError(source, _line_of(text, key, k), dotted, v,
                                        f"expected {e} ({known[k].metadata['help']})") from None
            setattr(sc, key, section_obj)
        elif key in top:
            kind, choices = top[key]
            if not isinstance(value, str) or (choices and value not in choices):
                exp = "one of " + ", ".join(choices) if choices else "a string"
                raise ScenarioError(source, _line_of(text, None, key), key, value, "expected " + exp)
            setattr(sc, key, Policy(value) if key == "policy" else value)
        else:
            raise ScenarioError(source, _line_of(text, None, key) or _section_line(text, key), key, value,
                                "unknown key; known: " + ", ".join([*top, *Scenario.SECTIONS, "costs"]))
    _cross_check(sc, text)
    return sc


def _costs(table: Any, text: str, source: str) -> Costs:
    """The [costs] table: each key a Costs entry, each value a positive finite number."""
    if not isinstance(table, dict):
        raise ScenarioError(source, _line_of(text, None, "costs"), "costs", table, "a table [costs]")
    known = Costs.names()
    units = {name: unit for name, _, unit, _, _ in Costs.describe()}
    changes: dict[str, float] = {}
    for k, v in table.items():
        dotted = f"costs.{k}"
        line = _line_of(text, "costs", k) or _section_line(text, "costs")
        if k not in known:
            raise ScenarioError(source, line, dotted, v, "unknown key; known keys: " + ", ".join(known))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
            raise ScenarioError(source, line, dotted, v, "expected a positive number of " + ("seconds" if units[k] == "s" else units[k]))
        changes[k] = float(v)
    return Costs().replace(**changes)


def _cross_check(sc: Scenario, text: str) -> None:
    h = sc.host
    if h.ipfrag_low_thresh > h.ipfrag_high_thresh:
        raise ScenarioError(sc.source, _line_of(text, "host", "ipfrag_low_thresh"), "host.ipfrag_low_thresh",
                            h.ipfrag_low_thresh, f"expected at most host.ipfrag_high_thresh ({h.ipfrag_high_thresh})")
    if h.ram % h.page_size:
        raise ScenarioError(sc.source, _line_of(text, "host", "ram"), "host.ram", format_size(h.ram),
                            "expected a whole number of pages")
    if h.min_free_kbytes * 1024 * 2 >= h.ram:
        raise ScenarioError(sc.source, _line_of(text, "host", "min_free_kbytes"), "host.min_free_kbytes",
                            h.min_free_kbytes, f"expected well below host.ram ({format_size(h.ram)})")
    swap_needed = sc.workload.working_set + sc.traffic.apps * sc.traffic.app_pages * h.page_size
    if swap_needed > h.swap + h.ram:
        raise ScenarioError(sc.source, _line_of(text, "workload", "working_set"), "workload.working_set",
                            format_size(sc.workload.working_set),
                            f"expected to fit in host.ram + host.swap ({format_size(h.ram + h.swap)})")


def load(path: str | Path) -> Scenario:
    """Load a scenario file, or a shipped one by name (`demo`, `tiny` ...)."""
    p = Path(path)
    if not p.exists() and not str(path).endswith(".toml"):
        bundled = resources.files("emu").joinpath("scenarios", f"{path}.toml")
        if bundled.is_file():
            return loads(bundled.read_text(), source=f"{path}.toml (shipped)")
    try:
        text = p.read_text()
    except OSError as e:
        hint = "" if p.exists() or "/" in str(path) else f" (shipped scenarios: {', '.join(shipped())})"
        raise ScenarioError(str(path), None, "<file>", str(path), f"cannot read: {e.strerror}{hint}") from None
    return loads(text, source=str(path))


def shipped() -> list[str]:
    return sorted(r.name[:-5] for r in resources.files("emu").joinpath("scenarios").iterdir() if r.name.endswith(".toml"))


def default() -> Scenario:
    """The demo's scenario: its host, its workload and its background traffic."""
    return load(DEFAULT_SCENARIO)


# --- writing ----------------------------------------------------------------------------------


def _toml_value(v: Any, kind: str | None = None) -> str:
    if kind == "size":
        return f'"{format_size(v)}"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def dumps(sc: Scenario) -> str:
    out = []
    for key in ("name", "description", "backend", "policy", "server"):
        v = getattr(sc, key)
        out.append(f"{key} = {_toml_value(v.value if isinstance(v, Policy) else v)}")
    for s in Scenario.SECTIONS:
        out.append(f"\n[{s}]")
        obj = getattr(sc, s)
        for f in fields(obj):
            out.append(f"{f.name} = {_toml_value(getattr(obj, f.name), f.metadata['kind'])}  # {f.metadata['help']}")
    out.append("\n[costs]  # the model's cost table (emulated seconds; the link in bits/s)")
    for name, _, unit, help, _ in Costs.describe():
        out.append(f"{name} = {getattr(sc.costs, name)!r}  # {unit}: {help}")
    return "\n".join(out) + "\n"


# --- one key at a time (sweeps, the cluster) ---------------------------------------------------

_TOP_CHOICES = {"backend": BACKENDS, "policy": POLICIES}


def key_meta(dotted: str) -> dict[str, Any]:
    """The schema entry of `section.key` (`kind`, bounds, `help`), or of a top-level choice key.
    Raises KeyError with the known keys when there is no such key."""
    if dotted in _TOP_CHOICES:
        return {"kind": "choice", "choices": _TOP_CHOICES[dotted], "help": dotted}
    section, _, key = dotted.partition(".")
    if section == "costs":
        if key not in Costs.names():
            raise KeyError(f"unknown key {dotted!r}; known costs: " + ", ".join(Costs.names()))
        return {"kind": "float", "min": 0.0, "help": f"cost {key}", "positive": True}
    known = {f.name: f for f in fields(globals()[section.capitalize() + "Section"])} if section in Scenario.SECTIONS else {}
    if key not in known:
        keys = [f"{s}.{f.name}" for s in Scenario.SECTIONS for f in fields(type(getattr(Scenario(), s)))]
        raise KeyError(f"unknown key {dotted!r}; known keys: " + ", ".join([*_TOP_CHOICES, *keys, "costs.NAME"]))
    return dict(known[key].metadata)


def set_values(sc: Scenario, values: dict[str, Any], source: str | None = None) -> Scenario:
    """A copy of `sc` with each `section.key` set to its value, validated as a file would be (the
    bounds, the choices and the cross-checks); a bad value raises ScenarioError naming the key."""
    d = loads(dumps(sc), source=sc.source)
    src = source or f"{sc.source} with {', '.join(f'{k}={v}' for k, v in values.items())}"
    for dotted, value in values.items():
        try:
            meta = key_meta(dotted)
        except KeyError as e:
            raise ScenarioError(src, None, dotted, value, str(e.args[0])) from None
        section, _, key = dotted.partition(".")
        if section == "costs":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ScenarioError(src, None, dotted, value, "expected a positive finite number")
            d.costs = d.costs.replace(**{key: float(value)})
            continue
        if not key:
            if value not in meta["choices"]:
                raise ScenarioError(src, None, dotted, value, "expected one of " + ", ".join(meta["choices"]))
            setattr(d, dotted, Policy(value) if dotted == "policy" else value)
            continue
        try:
            setattr(getattr(d, section), key, _convert(value, meta))
        except ValueError as e:
            raise ScenarioError(src, None, dotted, value, f"expected {e} ({meta['help']})") from None
    out = loads(dumps(d), source=src)
    out.source = sc.source
    return out
