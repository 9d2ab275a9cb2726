"""The published /proc/reserve_info that the reserve tree, `netswap reserve` and the host's
/proc view must each reproduce to the kilobyte.

Peter Zijlstra's sample in the comment of mm/reserve.c ("Simple output of the reserve tree in:
/proc/reserve_info"), swap-over-NFS series, 2008.  Reproduced with: 4 KiB pages, a machine of
128 MiB (route hash 1024 buckets -> ip_rt_max_size 16384 of 320-byte dst entries),
ipfrag_high_thresh 262144, one NFS swapper with RPC_MAX_SLOT_TABLE 128 rpc_rqst in size-512
(53 TX pages).
"""

PUBLISHED = """\
1:0 "total reserve" 6232K 0/278581
2:1 "total network reserve" 6232K 0/278581
3:2 "network TX reserve" 212K 0/53
4:3 "protocol TX pages" 212K 0/53
5:2 "network RX reserve" 6020K 0/278528
6:5 "IPv4 route cache" 5508K 0/16384
7:5 "SKB data reserve" 512K 0/262144
8:7 "IPv4 fragment cache" 512K 0/262144
"""
