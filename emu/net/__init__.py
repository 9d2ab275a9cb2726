"""The emulated network stack: skbs, sockets, IP, and the emergency-aware receive stage."""
