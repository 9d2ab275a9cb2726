"""Real peers on loopback for interop tests and benchmarks: servers started as processes (ours
and the Debian ones: nfs-ganesha, tgtd), packet capture, and the peers' client tools (libnfs,
libiscsi and its conformance suite, counted honestly). Each launcher stops what it started, by its
pid, also when the body fails."""
