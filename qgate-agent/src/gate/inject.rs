//! Delivering held bytes to the server ourselves, at once, instead of waiting
//! for the client's retransmission timer (200 ms and doubling).
//!
//! DESIGN.md, "Mechanisms verified on this kernel": the IP packet is rebuilt
//! from the newest held copy's TCP header (its timestamps and window), with
//! full checksums (veth hands over checksum-partial packets, which fail as
//! `TcpInCsumErrors` when re-sent unchanged), and sent through a raw socket
//! with `SO_MARK` = [`QGATE_MARK`] so the tc program lets it pass. It reaches
//! the server's TCP via `lo`.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use etherparse::{IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, TcpHeader};
use qgate_common::QGATE_MARK;

use crate::flow::Flow;

/// Payload bytes per injected packet: IPv4's 16-bit total length minus
/// headers, rounded down. `lo` takes packets this large.
pub const MAX_PAYLOAD: usize = 65_000;

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("raw socket: {0}")]
    Socket(io::Error),
    #[error("sending {len} bytes at seq {seq} to {dst}: {source}")]
    Send {
        len: usize,
        seq: u32,
        dst: SocketAddr,
        source: io::Error,
    },
    #[error("held segment has no usable TCP header to rebuild from: {0}")]
    BadTemplate(String),
    #[error("client and server address families differ")]
    MixedFamilies,
}

/// Raw sockets for IPv4 and IPv6 (`IPPROTO_RAW`: we write the IP header).
pub struct Injector {
    v4: OwnedFd,
    v6: Option<OwnedFd>,
}

fn raw_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mark = QGATE_MARK;
    // SAFETY: valid fd and option buffer of the right size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            &mark as *const u32 as *const libc::c_void,
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

impl Injector {
    pub fn new() -> Result<Self, InjectError> {
        Ok(Self {
            v4: raw_socket(libc::AF_INET).map_err(InjectError::Socket)?,
            v6: raw_socket(libc::AF_INET6).ok(),
        })
    }

    /// Sends `payload` as client→server bytes starting at `seq`, cut into
    /// packets of at most [`MAX_PAYLOAD`], each with the template's TCP header.
    pub fn inject(
        &self,
        flow: &Flow,
        template: &[u8],
        seq: u32,
        payload: &[u8],
    ) -> Result<(), InjectError> {
        let mut offset = 0;
        while offset < payload.len() {
            let end = (offset + MAX_PAYLOAD).min(payload.len());
            let at = seq.wrapping_add(offset as u32);
            let packet = build_packet(flow, template, at, &payload[offset..end])?;
            self.send(flow, &packet, at, end - offset)?;
            offset = end;
        }
        Ok(())
    }

    /// Resets a connection on both sides, in each side's name: the client
    /// gets an RST from the server at `server_seq` (the server's next
    /// sequence number), the server one from the client at `client_seq`.
    pub fn reset_both(
        &self,
        flow: &Flow,
        server_seq: u32,
        client_seq: u32,
    ) -> Result<(), InjectError> {
        let back = Flow {
            client: flow.server,
            server: flow.client,
        };
        let mut to_client = TcpHeader::new(flow.server.port(), flow.client.port(), server_seq, 0);
        to_client.rst = true;
        let packet = segment_packet(&back, to_client, &[])?;
        self.send(&back, &packet, server_seq, 0)?;
        let mut to_server = TcpHeader::new(flow.client.port(), flow.server.port(), client_seq, 0);
        to_server.rst = true;
        let packet = segment_packet(flow, to_server, &[])?;
        self.send(flow, &packet, client_seq, 0)
    }

    fn send(&self, flow: &Flow, packet: &[u8], seq: u32, len: usize) -> Result<(), InjectError> {
        let dst = flow.server;
        let rc = match dst.ip() {
            IpAddr::V4(ip) => {
                let addr = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(ip.octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: valid fd, buffer and address for the call.
                unsafe {
                    libc::sendto(
                        self.v4.as_raw_fd(),
                        packet.as_ptr() as *const libc::c_void,
                        packet.len(),
                        0,
                        &addr as *const libc::sockaddr_in as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                }
            }
            IpAddr::V6(ip) => {
                let Some(fd) = &self.v6 else {
                    return Err(InjectError::Socket(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "no IPv6 raw socket on this host",
                    )));
                };
                let addr = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: 0,
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    sin6_scope_id: 0,
                };
                // SAFETY: valid fd, buffer and address for the call.
                unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        packet.as_ptr() as *const libc::c_void,
                        packet.len(),
                        0,
                        &addr as *const libc::sockaddr_in6 as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                    )
                }
            }
        };
        if rc < 0 {
            return Err(InjectError::Send {
                len,
                seq,
                dst,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

/// An IP packet carrying `payload` at `seq` from the client to the server,
/// TCP header (options included) from `template`, checksums computed.
pub fn build_packet(
    flow: &Flow,
    template: &[u8],
    seq: u32,
    payload: &[u8],
) -> Result<Vec<u8>, InjectError> {
    let (mut tcp, _) =
        TcpHeader::from_slice(template).map_err(|e| InjectError::BadTemplate(e.to_string()))?;
    tcp.sequence_number = seq;
    // Only data: a held copy may have carried FIN, which must come from the client itself.
    tcp.fin = false;
    tcp.syn = false;
    tcp.rst = false;
    tcp.psh = true;
    segment_packet(flow, tcp, payload)
}

/// An IP packet from `flow.client` to `flow.server` with `tcp` and
/// `payload`, checksums computed.
fn segment_packet(flow: &Flow, mut tcp: TcpHeader, payload: &[u8]) -> Result<Vec<u8>, InjectError> {
    let tcp_len = tcp.header_len() + payload.len();
    let mut packet = Vec::with_capacity(60 + tcp_len);
    match (flow.client.ip(), flow.server.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut ip = Ipv4Header::new(
                u16::try_from(tcp_len).map_err(|_| InjectError::BadTemplate("too long".into()))?,
                64,
                IpNumber::TCP,
                src.octets(),
                dst.octets(),
            )
            .map_err(|e| InjectError::BadTemplate(e.to_string()))?;
            ip.header_checksum = ip.calc_header_checksum();
            tcp.checksum = tcp
                .calc_checksum_ipv4(&ip, payload)
                .map_err(|e| InjectError::BadTemplate(e.to_string()))?;
            packet.extend_from_slice(&ip.to_bytes());
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let ip = Ipv6Header {
                traffic_class: 0,
                flow_label: Ipv6FlowLabel::ZERO,
                payload_length: u16::try_from(tcp_len)
                    .map_err(|_| InjectError::BadTemplate("too long".into()))?,
                next_header: IpNumber::TCP,
                hop_limit: 64,
                source: src.octets(),
                destination: dst.octets(),
            };
            tcp.checksum = tcp
                .calc_checksum_ipv6(&ip, payload)
                .map_err(|e| InjectError::BadTemplate(e.to_string()))?;
            packet.extend_from_slice(&ip.to_bytes());
        }
        _ => return Err(InjectError::MixedFamilies),
    }
    packet.extend_from_slice(&tcp.to_bytes());
    packet.extend_from_slice(payload);
    Ok(packet)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Vec<u8> {
        let mut tcp = TcpHeader::new(40000, 5432, 1000, 512);
        tcp.ack = true;
        tcp.acknowledgment_number = 77;
        tcp.fin = true;
        tcp.options = etherparse::TcpOptions::try_from_elements(&[
            etherparse::TcpOptionElement::Noop,
            etherparse::TcpOptionElement::Noop,
            etherparse::TcpOptionElement::Timestamp(111, 222),
        ])
        .unwrap();
        tcp.to_bytes().to_vec()
    }

    #[test]
    fn rebuilt_packet_keeps_timestamps_and_has_valid_checksums() {
        let flow = Flow {
            client: "10.1.2.3:40000".parse().unwrap(),
            server: "10.1.2.4:5432".parse().unwrap(),
        };
        let payload = b"Q\0\0\0\rSELECT 1;\0";
        let packet = build_packet(&flow, &template(), 5000, payload).unwrap();
        let parsed = etherparse::SlicedPacket::from_ip(&packet).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = parsed.net else {
            panic!("not IPv4")
        };
        assert_eq!(ip.header().source(), [10, 1, 2, 3]);
        assert_eq!(
            ip.header().header_checksum(),
            ip.header().to_header().calc_header_checksum()
        );
        let Some(etherparse::TransportSlice::Tcp(tcp)) = parsed.transport else {
            panic!("not TCP")
        };
        assert_eq!(tcp.sequence_number(), 5000);
        assert_eq!(tcp.acknowledgment_number(), 77);
        assert!(!tcp.fin(), "FIN is never re-sent by the agent");
        assert_eq!(tcp.payload(), payload);
        let expected = tcp
            .to_header()
            .calc_checksum_ipv4_raw([10, 1, 2, 3], [10, 1, 2, 4], payload)
            .unwrap();
        assert_eq!(tcp.checksum(), expected);
        assert!(tcp
            .options_iterator()
            .any(|o| matches!(o, Ok(etherparse::TcpOptionElement::Timestamp(111, 222)))));
    }

    #[test]
    fn template_that_is_not_tcp_is_a_clear_error() {
        let flow = Flow {
            client: "10.1.2.3:40000".parse().unwrap(),
            server: "10.1.2.4:5432".parse().unwrap(),
        };
        let err = build_packet(&flow, &[1, 2, 3], 1, b"x").unwrap_err();
        assert!(err.to_string().contains("TCP header"), "{err}");
    }
}
