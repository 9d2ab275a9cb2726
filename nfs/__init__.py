"""ONC RPC, MOUNT v3 and NFSv3: sans-IO codecs, a trio server, and a client with pluggable transport."""
