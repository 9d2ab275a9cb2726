"""netswap's emulated host: memory management (mm), network stack (net), traffic, and the CLI."""

__version__ = "0.1.0"
