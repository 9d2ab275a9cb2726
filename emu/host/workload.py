"""Workloads: emulated processes whose anonymous working set exceeds RAM.

An access pattern is a pure generator of (page number, write?) pairs; the first pass always
writes every page once in order (so each page has content before it can be read back). After
that:

- `sequential`: pass after pass over the pages in order (the worst case for LRU);
- `random`: uniformly random pages;
- `hotcold`: a hot fraction of the pages gets most accesses, the rest are touched rarely, so
  reclaim has a real choice to make (the referenced bit matters).

A write gives the page a new version; a read faults it back in and the memory manager checks its
bytes against (process, page, version). Mismatches are counted, never ignored.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Pattern:
    kind: str
    nr_pages: int
    passes: int
    seed: int = 1
    hot_fraction: float = 0.2
    hot_probability: float = 0.8
    write_fraction: float = 1.0

    def __len__(self) -> int:
        return self.nr_pages * self.passes

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        n = self.nr_pages
        rng = random.Random(self.seed)
        for page in range(n):
            yield page, True
        hot = max(1, int(n * self.hot_fraction))
        for i in range(n * (self.passes - 1)):
            if self.kind == "sequential":
                page = i % n
            elif self.kind == "random":
                page = rng.randrange(n)
            elif self.kind == "hotcold":
                if hot >= n or rng.random() < self.hot_probability:
                    page = rng.randrange(hot)
                else:
                    page = hot + rng.randrange(n - hot)
            else:
                raise ValueError(f"unknown workload {self.kind!r}")
            yield page, rng.random() < self.write_fraction


def split_pages(total_pages: int, processes: int) -> list[int]:
    """Divide a working set among processes (the first ones take the remainder)."""
    base, extra = divmod(total_pages, processes)
    return [base + (1 if i < extra else 0) for i in range(processes)]
