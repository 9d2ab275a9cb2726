"""iSCSI (RFC 7143) and SCSI block commands: sans-IO PDUs and login, a trio target, and an initiator."""
