"""The emulated kernel's base: task context (`sched`), emulated time (`clock`), the CPU and its
cost table (`cpu`), and the reserve design the host runs (`policy`).  Imports nothing else from
emu; every other layer may import it."""
