//! Reading capture files: both formats, both byte orders, every supported
//! link type, on crafted files.
use std::{io::Cursor, net::SocketAddr, path::Path};

use etherparse::{PacketBuilder, VlanId};
use qgate_agent::{
    capture::{
        pcap::{PcapError, SegmentReader},
        Segment,
    },
    flow::Direction,
};

const PAYLOAD: &[u8] = b"Q\0\0\0\x0dSELECT 1\0";

fn ipv4_tcp(sport: u16, dport: u16, seq: u32) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
        .tcp(sport, dport, seq, 1024)
        .psh()
        .ack(1)
        .write(&mut out, PAYLOAD)
        .expect("building a packet");
    out
}

fn ipv6_tcp(sport: u16, dport: u16, seq: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut a = [0u8; 16];
    a[15] = 2;
    let mut b = [0u8; 16];
    b[15] = 1;
    PacketBuilder::ipv6(a, b, 64)
        .tcp(sport, dport, seq, 1024)
        .syn()
        .write(&mut out, PAYLOAD)
        .expect("building a packet");
    out
}

fn ethernet_vlan_tcp() -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([1; 6], [2; 6])
        .single_vlan(VlanId::try_new(7).expect("vlan id"))
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(5432, 40000, 99, 1024)
        .fin()
        .write(&mut out, PAYLOAD)
        .expect("building a packet");
    out
}

/// Legacy pcap: `big_endian` and `nanos` select the magic and byte order.
fn legacy_pcap(linktype: u32, big_endian: bool, nanos: bool, frames: &[(u32, &[u8])]) -> Vec<u8> {
    let u32b = |v: u32| {
        if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let u16b = |v: u16| {
        if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let mut f = u32b(if nanos { 0xa1b2_3c4d } else { 0xa1b2_c3d4 }).to_vec();
    f.extend(u16b(2));
    f.extend(u16b(4));
    f.extend(u32b(0));
    f.extend(u32b(0));
    f.extend(u32b(65535));
    f.extend(u32b(linktype));
    for (i, (origlen, data)) in frames.iter().enumerate() {
        f.extend(u32b(1_700_000_000 + i as u32));
        f.extend(u32b(250));
        f.extend(u32b(data.len() as u32));
        f.extend(u32b(*origlen));
        f.extend_from_slice(data);
    }
    f
}

/// pcapng with one interface at nanosecond resolution.
fn pcapng(linktype: u16, big_endian: bool, frames: &[&[u8]]) -> Vec<u8> {
    let u32b = |v: u32| {
        if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let u16b = |v: u16| {
        if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let block = |f: &mut Vec<u8>, kind: u32, body: &[u8]| {
        let len = 12 + body.len() as u32;
        f.extend(u32b(kind));
        f.extend(u32b(len));
        f.extend_from_slice(body);
        f.extend(u32b(len));
    };
    let mut f = Vec::new();
    let mut shb = u32b(0x1a2b_3c4d).to_vec();
    shb.extend(u16b(1));
    shb.extend(u16b(0));
    shb.extend([0xff; 8]);
    block(&mut f, 0x0a0d_0d0a, &shb);
    let mut idb = u16b(linktype).to_vec();
    idb.extend(u16b(0));
    idb.extend(u32b(65535));
    idb.extend(u16b(9)); // if_tsresol
    idb.extend(u16b(1));
    idb.extend([9, 0, 0, 0]); // 10^-9, padded
    idb.extend(u16b(0)); // opt_endofopt
    idb.extend(u16b(0));
    block(&mut f, 1, &idb);
    for data in frames {
        let ts: u64 = 1_700_000_000_123_456_789;
        let mut epb = u32b(0).to_vec();
        epb.extend(u32b((ts >> 32) as u32));
        epb.extend(u32b(ts as u32));
        epb.extend(u32b(data.len() as u32));
        epb.extend(u32b(data.len() as u32));
        epb.extend_from_slice(data);
        epb.resize(epb.len().next_multiple_of(4), 0);
        block(&mut f, 6, &epb);
    }
    f
}

fn read(file: Vec<u8>, ports: &[u16]) -> (Vec<Segment>, SegmentReader) {
    let mut reader = SegmentReader::from_reader(Path::new("crafted"), Cursor::new(file), ports)
        .expect("a capture");
    let segments = reader
        .by_ref()
        .collect::<Result<Vec<_>, _>>()
        .expect("readable");
    (segments, reader)
}

fn sll(ip: &[u8], ethertype: u16) -> Vec<u8> {
    let mut f = vec![0, 0, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0];
    f.extend(ethertype.to_be_bytes());
    f.extend_from_slice(ip);
    f
}

fn sll2(ip: &[u8], ethertype: u16) -> Vec<u8> {
    let mut f = ethertype.to_be_bytes().to_vec();
    f.extend([0, 0, 0, 0, 0, 1, 0, 1, 0, 6, 1, 2, 3, 4, 5, 6, 0, 0]);
    f.extend_from_slice(ip);
    f
}

#[test]
fn a_little_endian_ethernet_pcap_gives_segments_with_direction_and_time() {
    let frame = {
        let mut out = Vec::new();
        PacketBuilder::ethernet2([1; 6], [2; 6])
            .ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            .tcp(40000, 5432, 1234, 1024)
            .psh()
            .ack(1)
            .write(&mut out, PAYLOAD)
            .expect("building a packet");
        out
    };
    let (segments, reader) = read(
        legacy_pcap(1, false, false, &[(frame.len() as u32, &frame)]),
        &[5432],
    );
    assert_eq!(segments.len(), 1);
    let s = &segments[0];
    assert_eq!(
        s.flow.client,
        "10.0.0.2:40000".parse::<SocketAddr>().expect("address")
    );
    assert_eq!(
        s.flow.server,
        "10.0.0.1:5432".parse::<SocketAddr>().expect("address")
    );
    assert_eq!(s.direction, Direction::ToServer);
    assert_eq!(s.seq, 1234);
    assert_eq!(s.tcp_flags, 0x18);
    assert_eq!(s.at, 1_700_000_000_000_250_000);
    assert_eq!(s.payload, PAYLOAD);
    assert!(!s.truncated);
    assert_eq!(reader.stats().segments, 1);
}

#[test]
fn a_big_endian_nanosecond_pcap_of_linux_cooked_ipv6_is_read() {
    let frame = sll(&ipv6_tcp(40000, 5432, 7), 0x86dd);
    let (segments, _) = read(
        legacy_pcap(113, true, true, &[(frame.len() as u32, &frame)]),
        &[5432],
    );
    assert_eq!(segments.len(), 1);
    assert_eq!(segments[0].at, 1_700_000_000_000_000_250);
    assert!(segments[0].is_syn());
    assert!(segments[0].flow.server.is_ipv6());
}

#[test]
fn raw_ip_and_bsd_loopback_pcaps_are_read() {
    let raw = ipv4_tcp(40000, 5432, 1);
    let (segments, _) = read(
        legacy_pcap(101, false, false, &[(raw.len() as u32, &raw)]),
        &[5432],
    );
    assert_eq!(segments.len(), 1);
    let mut null = 24u32.to_le_bytes().to_vec();
    null.extend(ipv6_tcp(40000, 5432, 1));
    let mut lo = 2u32.to_be_bytes().to_vec();
    lo.extend(ipv4_tcp(40000, 5432, 1));
    for (linktype, frame) in [(0, null), (108, lo)] {
        let (segments, _) = read(
            legacy_pcap(linktype, false, false, &[(frame.len() as u32, &frame)]),
            &[5432],
        );
        assert_eq!(segments.len(), 1, "link type {linktype}");
    }
}

#[test]
fn pcapng_in_both_byte_orders_with_sll2_and_vlan_ethernet_is_read() {
    let frame = sll2(&ipv4_tcp(40000, 5432, 5), 0x0800);
    for big_endian in [false, true] {
        let (segments, _) = read(pcapng(276, big_endian, &[&frame]), &[5432]);
        assert_eq!(segments.len(), 1, "big endian: {big_endian}");
        assert_eq!(segments[0].at, 1_700_000_000_123_456_789);
    }
    let vlan = ethernet_vlan_tcp();
    let (segments, _) = read(pcapng(1, false, &[&vlan]), &[5432]);
    assert_eq!(segments.len(), 1);
    assert_eq!(segments[0].direction, Direction::FromServer);
    assert!(segments[0].is_fin());
}

#[test]
fn a_packet_cut_by_the_snapshot_length_is_marked_truncated() {
    let raw = ipv4_tcp(40000, 5432, 1);
    let cut = &raw[..raw.len() - 5];
    let (segments, _) = read(
        legacy_pcap(101, false, false, &[(raw.len() as u32, cut)]),
        &[5432],
    );
    assert_eq!(segments.len(), 1);
    assert!(segments[0].truncated);
    assert_eq!(segments[0].payload, &PAYLOAD[..PAYLOAD.len() - 5]);
}

#[test]
fn other_ports_and_unknown_link_types_are_counted_not_returned() {
    let other = ipv4_tcp(40000, 3306, 1);
    let (segments, reader) = read(
        legacy_pcap(101, false, false, &[(other.len() as u32, &other)]),
        &[5432],
    );
    assert!(segments.is_empty());
    assert_eq!(reader.stats().other_traffic, 1);
    let (segments, reader) = read(
        legacy_pcap(147, false, false, &[(other.len() as u32, &other)]),
        &[5432],
    );
    assert!(segments.is_empty());
    assert_eq!(reader.stats().unsupported_link, 1);
}

#[test]
fn a_file_that_is_not_a_capture_is_a_clear_error() {
    let result = SegmentReader::from_reader(
        Path::new("notes.txt"),
        Cursor::new(b"hello, this is not a capture file at all".to_vec()),
        &[5432],
    );
    match result {
        Err(PcapError::NotACapture { path, .. }) => assert_eq!(path, Path::new("notes.txt")),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("text accepted as a capture"),
    }
}

#[test]
fn a_capture_cut_in_the_middle_of_a_record_keeps_what_came_before() {
    let raw = ipv4_tcp(40000, 5432, 1);
    let mut file = legacy_pcap(
        101,
        false,
        false,
        &[(raw.len() as u32, &raw), (raw.len() as u32, &raw)],
    );
    file.truncate(file.len() - 10);
    let (segments, reader) = read(file, &[5432]);
    assert_eq!(segments.len(), 1);
    assert!(reader.stats().truncated_file);
}
