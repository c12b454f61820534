//! Reading segments from a pcap or pcapng file (to be written).
