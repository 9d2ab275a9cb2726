"""Real peers on loopback for interop tests and benchmarks: servers started as processes (ours
and the Debian ones), packet capture, and the peers' client tools. Each launcher stops what it
started, by its pid, also when the body fails."""
