"""Subcommands of `netswap`, one module each."""
