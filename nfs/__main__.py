"""`python -m nfs --export DIR ...`: the NFS server on its own (same as `netswap serve nfs`)."""

from nfs.cli import serve_nfs

serve_nfs(prog_name="python -m nfs")
