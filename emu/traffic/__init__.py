"""Background traffic built with scapy and sent on loopback."""
