"""The emulated memory manager: pages, gfp, reserve, slab, reclaim, swap."""
