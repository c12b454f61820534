//! Reading segments from a capture file: legacy pcap (either byte order,
//! micro- or nanosecond timestamps) or pcapng (any number of sections and
//! interfaces), with Ethernet (VLAN tags included), Linux cooked (SLL and
//! SLL2), raw IPv4/IPv6 or BSD loopback link layers.
//!
//! Only TCP segments with a database port at one end become [`Segment`]s;
//! the port decides the direction. [`SegmentReader::stats`] says what was
//! passed over, so nothing is dropped without a trace.
use std::{
    fs::File,
    io::Read,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use etherparse::{EtherType, LaxNetSlice, LaxSlicedPacket, TransportSlice};
use pcap_parser::{
    create_reader, pcapng::Block, traits::PcapReaderIterator, Linktype, PcapBlockOwned,
};

use super::{Direction, Flow, Segment};
use crate::clock::UnixNanos;

/// The reader's initial buffer; it grows for larger packets.
const INITIAL_BUFFER: usize = 1 << 20;
/// No capture block is allowed to be larger than this.
const MAX_BUFFER: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PcapError {
    #[error("opening capture {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a pcap or pcapng file ({detail})")]
    NotACapture { path: PathBuf, detail: String },
    #[error("reading capture {path}: {detail}")]
    Read { path: PathBuf, detail: String },
}

/// What a [`SegmentReader`] passed over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PcapStats {
    pub packets: u64,
    pub segments: u64,
    /// Not TCP over IPv4/IPv6, or a TCP segment with no database port.
    pub other_traffic: u64,
    /// Link types this reader does not know.
    pub unsupported_link: u64,
    /// IP fragments: their TCP header is not in every fragment.
    pub fragments: u64,
    /// The file ends in the middle of a packet record.
    pub truncated_file: bool,
}

#[derive(Clone, Copy, Debug)]
struct Interface {
    linktype: Linktype,
    /// Timestamp units per second.
    resolution: u64,
    /// Seconds added to every timestamp.
    offset_secs: i64,
}

/// An iterator over a capture file's database segments.
pub struct SegmentReader {
    path: PathBuf,
    reader: Box<dyn PcapReaderIterator + Send>,
    ports: Vec<u16>,
    /// Legacy pcap: the one link type; pcapng: one per interface of the
    /// current section.
    interfaces: Vec<Interface>,
    legacy_nanos: bool,
    stats: PcapStats,
    done: bool,
}

/// Every segment of `path` to or from one of `ports`, in file order.
pub fn read_segments(path: &Path, ports: &[u16]) -> Result<Vec<Segment>, PcapError> {
    SegmentReader::open(path, ports)?.collect()
}

impl SegmentReader {
    pub fn open(path: &Path, ports: &[u16]) -> Result<Self, PcapError> {
        let file = File::open(path).map_err(|source| PcapError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::from_reader(path, file, ports)
    }

    /// `name` only labels errors.
    pub fn from_reader(
        name: &Path,
        input: impl Read + Send + 'static,
        ports: &[u16],
    ) -> Result<Self, PcapError> {
        let reader = create_reader(INITIAL_BUFFER, input).map_err(|e| PcapError::NotACapture {
            path: name.to_owned(),
            detail: format!("{e:?}"),
        })?;
        Ok(Self {
            path: name.to_owned(),
            reader,
            ports: ports.to_vec(),
            interfaces: Vec::new(),
            legacy_nanos: false,
            stats: PcapStats::default(),
            done: false,
        })
    }

    pub fn stats(&self) -> PcapStats {
        self.stats
    }

    /// The next database segment, or `None` at the end of the file.
    fn next_segment(&mut self) -> Result<Option<Segment>, PcapError> {
        loop {
            let (consumed, segment) = match self.reader.next() {
                Ok((consumed, block)) => {
                    let segment = match block {
                        PcapBlockOwned::LegacyHeader(header) => {
                            self.legacy_nanos = header.is_nanosecond_precision();
                            self.interfaces = vec![Interface {
                                linktype: header.network,
                                resolution: if self.legacy_nanos {
                                    1_000_000_000
                                } else {
                                    1_000_000
                                },
                                offset_secs: 0,
                            }];
                            None
                        }
                        PcapBlockOwned::Legacy(b) => {
                            let at = i64::from(b.ts_sec) * 1_000_000_000
                                + i64::from(b.ts_usec) * if self.legacy_nanos { 1 } else { 1_000 };
                            Packet {
                                stats: &mut self.stats,
                                ports: &self.ports,
                                interfaces: &self.interfaces,
                            }
                            .segment(0, at, b.data)
                        }
                        PcapBlockOwned::NG(Block::SectionHeader(_)) => {
                            self.interfaces.clear();
                            None
                        }
                        PcapBlockOwned::NG(Block::InterfaceDescription(idb)) => {
                            self.interfaces.push(Interface {
                                linktype: idb.linktype,
                                resolution: idb.ts_resolution().unwrap_or(1_000_000),
                                offset_secs: idb.ts_offset(),
                            });
                            None
                        }
                        PcapBlockOwned::NG(Block::EnhancedPacket(epb)) => {
                            let caplen = (epb.caplen as usize).min(epb.data.len());
                            let at = self.interfaces.get(epb.if_id as usize).map_or(0, |i| {
                                pcapng_nanos(epb.ts_high, epb.ts_low, i.resolution, i.offset_secs)
                            });
                            Packet {
                                stats: &mut self.stats,
                                ports: &self.ports,
                                interfaces: &self.interfaces,
                            }
                            .segment(
                                epb.if_id as usize,
                                at,
                                &epb.data[..caplen],
                            )
                        }
                        PcapBlockOwned::NG(Block::SimplePacket(spb)) => {
                            // Simple packets carry no timestamp.
                            let len = (spb.origlen as usize).min(spb.data.len());
                            Packet {
                                stats: &mut self.stats,
                                ports: &self.ports,
                                interfaces: &self.interfaces,
                            }
                            .segment(0, 0, &spb.data[..len])
                        }
                        PcapBlockOwned::NG(_) => None,
                    };
                    (consumed, segment)
                }
                Err(pcap_parser::PcapError::Eof) => return Ok(None),
                Err(pcap_parser::PcapError::UnexpectedEof) => {
                    self.stats.truncated_file = true;
                    return Ok(None);
                }
                Err(pcap_parser::PcapError::Incomplete(_)) => {
                    self.reader
                        .refill()
                        .map_err(|e| read_error(&self.path, format!("{e:?}")))?;
                    continue;
                }
                Err(pcap_parser::PcapError::BufferTooSmall) => {
                    let size = self.reader.data().len().max(INITIAL_BUFFER) * 2;
                    if size > MAX_BUFFER || !self.reader.grow(size) {
                        return Err(read_error(&self.path, "a block larger than 256 MiB".into()));
                    }
                    self.reader
                        .refill()
                        .map_err(|e| read_error(&self.path, format!("{e:?}")))?;
                    continue;
                }
                Err(e) => return Err(read_error(&self.path, format!("{e:?}"))),
            };
            self.reader.consume(consumed);
            if let Some(segment) = segment {
                return Ok(Some(segment));
            }
        }
    }
}

fn read_error(path: &Path, detail: String) -> PcapError {
    PcapError::Read {
        path: path.to_owned(),
        detail,
    }
}

/// Turns one captured frame into a [`Segment`], counting what it skips.
struct Packet<'r> {
    stats: &'r mut PcapStats,
    ports: &'r [u16],
    interfaces: &'r [Interface],
}

impl Packet<'_> {
    fn segment(&mut self, interface: usize, at: UnixNanos, data: &[u8]) -> Option<Segment> {
        self.stats.packets += 1;
        let Some(linktype) = self.interfaces.get(interface).map(|i| i.linktype) else {
            self.stats.unsupported_link += 1;
            return None;
        };
        let segment = self.decode(linktype, at, data);
        if segment.is_some() {
            self.stats.segments += 1;
        }
        segment
    }

    /// Decodes one link-layer frame; `None` (counted) if it is not a
    /// database segment.
    fn decode(&mut self, linktype: Linktype, at: UnixNanos, data: &[u8]) -> Option<Segment> {
        let sliced = match linktype {
            Linktype::ETHERNET => LaxSlicedPacket::from_ethernet(data).ok(),
            Linktype::LINUX_SLL => data.get(16..).map(|ip| {
                let proto = u16::from_be_bytes([data[14], data[15]]);
                LaxSlicedPacket::from_ether_type(EtherType(proto), ip)
            }),
            Linktype::LINUX_SLL2 => data.get(20..).map(|ip| {
                let proto = u16::from_be_bytes([data[0], data[1]]);
                LaxSlicedPacket::from_ether_type(EtherType(proto), ip)
            }),
            Linktype::RAW | Linktype::IPV4 | Linktype::IPV6 => LaxSlicedPacket::from_ip(data).ok(),
            // The 4-byte address family is in the capturing host's byte
            // order; the IP version nibble is enough to go on.
            Linktype::NULL | Linktype::LOOP => data
                .get(4..)
                .and_then(|ip| LaxSlicedPacket::from_ip(ip).ok()),
            _ => {
                self.stats.unsupported_link += 1;
                return None;
            }
        };
        let Some(sliced) = sliced else {
            self.stats.other_traffic += 1;
            return None;
        };
        let (src, dst, incomplete, fragmented) = match &sliced.net {
            Some(LaxNetSlice::Ipv4(ip)) => (
                IpAddr::V4(ip.header().source_addr()),
                IpAddr::V4(ip.header().destination_addr()),
                ip.payload().incomplete,
                ip.payload().fragmented,
            ),
            Some(LaxNetSlice::Ipv6(ip)) => (
                IpAddr::V6(ip.header().source_addr()),
                IpAddr::V6(ip.header().destination_addr()),
                ip.payload().incomplete,
                ip.payload().fragmented,
            ),
            _ => {
                self.stats.other_traffic += 1;
                return None;
            }
        };
        if fragmented {
            self.stats.fragments += 1;
            return None;
        }
        let Some(TransportSlice::Tcp(tcp)) = &sliced.transport else {
            self.stats.other_traffic += 1;
            return None;
        };
        let (sport, dport) = (tcp.source_port(), tcp.destination_port());
        let (direction, client, server) = if self.ports.contains(&dport) {
            (
                Direction::ToServer,
                SocketAddr::new(src, sport),
                SocketAddr::new(dst, dport),
            )
        } else if self.ports.contains(&sport) {
            (
                Direction::FromServer,
                SocketAddr::new(dst, dport),
                SocketAddr::new(src, sport),
            )
        } else {
            self.stats.other_traffic += 1;
            return None;
        };
        // Byte 13 of the TCP header holds the flags (RFC 9293 §3.1).
        let tcp_flags = tcp.header_slice().get(13).copied().unwrap_or(0);
        Some(Segment {
            flow: Flow { client, server },
            direction,
            seq: tcp.sequence_number(),
            tcp_flags,
            at,
            payload: tcp.payload().to_vec(),
            truncated: incomplete,
            held: false,
            refused: false,
            tcp_header: Vec::new(),
        })
    }
}

impl Iterator for SegmentReader {
    type Item = Result<Segment, PcapError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let next = self.next_segment().transpose();
        if !matches!(next, Some(Ok(_))) {
            self.done = true;
        }
        next
    }
}

/// A pcapng timestamp (units of `resolution` per second since the epoch,
/// plus `offset_secs`) in Unix nanoseconds.
fn pcapng_nanos(high: u32, low: u32, resolution: u64, offset_secs: i64) -> UnixNanos {
    let units = (u128::from(high) << 32) | u128::from(low);
    let resolution = u128::from(resolution.max(1));
    let secs = units / resolution;
    let nanos = (units % resolution) * 1_000_000_000 / resolution;
    let total = (secs as i128 + i128::from(offset_secs)) * 1_000_000_000 + nanos as i128;
    i64::try_from(total).unwrap_or(i64::MAX)
}
