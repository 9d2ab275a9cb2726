"""The emulated memory manager: pages, gfp, reserve, slab, reclaim, swap.

One file per concept, named as the kernel names it:

- `gfp.py`         Gfp flags, GFP_* masks
- `sizes.py`       object sizes of the kernel structures (sk_buff, dst_entry, ipq, rpc_rqst ...)
- `page_alloc.py`  Page, Zone (watermarks, alloc_pages, alloc_pages_wait), gfp_to_alloc_flags
- `slab.py`        SLAB geometry and estimates, KmemCache, Slabs, kmalloc/kfree
- `reserve.py`     the v12 reserve tree (MemReserve, ReserveTree), its sizing, reserve alloc wrappers
- `vmscan.py`      LRU scan, Kswapd, direct reclaim, the pfmemalloc throttle
- `swap.py`        swap entries, SwapStorage, LocalFileSwap, SwapArea
- `process.py`     emulated processes with anonymous memory and verified content
- `mm.py`          Vm: one host's memory manager tying them together (run(), swapon(), swapin ...)
- `vmstat.py`      counters and the /proc/vmstat and /proc/meminfo views
"""
