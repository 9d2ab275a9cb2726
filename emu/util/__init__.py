"""Small helpers shared by the commands, the benchmarks, the host and the test peers.

One of each: sizes (`units`), free loopback ports (`ports`), child processes (`procs`).
Nothing in emu/kernel, emu/mm or emu/net imports this package; `nfs/` and `iscsi/` never do.
"""
