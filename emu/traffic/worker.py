"""`python -m emu.traffic.worker`: run one injection in its own process.

Reads a TrafficSpec mapping as JSON on stdin, writes InjectStats as JSON on stdout. Used by
`inject(..., isolate=True)` so a flood does not share the GIL with the emulated host's event loop:
on two cores, the sender and the receive stage then really run side by side. SIGTERM (what trio
sends when the caller is cancelled) stops the loop like Ctrl-C; the partial stats are still written.
"""

from __future__ import annotations

import json
import signal
import sys
import threading

from emu.traffic.api import run
from emu.traffic.spec import TrafficSpec


def main() -> int:
    spec = TrafficSpec.from_mapping(json.loads(sys.stdin.read()))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        stats = run(spec, stop=stop)
    except (OSError, ValueError) as exc:  # NeedsRawError, ConnectionRefusedError, TargetError ...
        json.dump({"error": type(exc).__name__, "message": str(exc)}, sys.stdout)
        return 1
    json.dump(stats.to_json(), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
