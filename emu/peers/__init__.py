"""Real peers on loopback (our servers and the Debian ones) for interop tests and benchmarks."""
