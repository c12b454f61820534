//! Server hook records as wire-stage input: each backend's reads and writes
//! become one gap-free synthetic TCP connection (a SYN, then the bytes in
//! order, then FINs when the backend exits), so the same decoder, session
//! pairing and store serve both capture points.
//!
//! The synthetic connection is named `[::<pid>]:0` → `[::]:0` (the
//! IPv4-compatible range no client uses), never by the session's real
//! addresses, so it cannot collide with a connection the tc programs
//! follow; [`BackendStep::Hooked`] gives the store and the gate the real
//! addresses from the backend's `Port` (none for a Unix socket: `local`).
//!
//! An SSLRequest or GSSENCRequest is not fed: the server's one-byte answer
//! does not go through `secure_write`, and after it the session goes on in
//! plain for the hook either way.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::FastMap as HashMap;

use qgate_common::{
    hook,
    pg::{GSSENC_REQUEST, SSL_REQUEST},
};

use super::{
    hook::{HookKind, HookRecord},
    Segment,
};
use crate::{
    clock::UnixNanos,
    flow::{Direction, Flow, Transport},
};

/// TCP flag bits (RFC 9293 §3.1) of the synthetic segments.
const SYN: u8 = 0x02;
const FIN: u8 = 0x01;
const ACK: u8 = 0x10;

/// A read the kernel stopped the backend after: the client stream's bytes
/// `[start, end)` (wire-stage offsets) sit at `addr` in the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoppedRead {
    pub pid: u32,
    pub flow: Flow,
    pub addr: u64,
    pub start: u64,
    pub end: u64,
    /// The backend's client socket descriptor (from its `Port`), if known.
    pub socket_fd: Option<i32>,
}

/// What one hook record means for the rest of the pipeline, in order.
#[derive(Clone, Debug)]
pub enum BackendStep {
    /// A new session: the store learns its transport after the SYN.
    Hooked {
        flow: Flow,
        pid: u32,
        transport: Transport,
        /// The real addresses (`None` for a Unix socket or when unknown).
        client: Option<SocketAddr>,
        server: Option<SocketAddr>,
    },
    /// Announced before the segment carrying the read, so the gate watches
    /// the connection while the wire stage decodes it.
    Stopped(StoppedRead),
    Segment(Segment),
    /// The backend exited (its segments closing the connection came first).
    Exited {
        pid: u32,
        flow: Option<Flow>,
    },
}

/// What `Port` says of a session (see `qgate_common::hook::PORT_PREFIX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortInfo {
    pub socket_fd: i32,
    /// `None` for a Unix socket.
    pub client: Option<SocketAddr>,
    pub server: Option<SocketAddr>,
}

/// Offsets in `struct Port` (src/include/libpq/libpq-be.h, PostgreSQL
/// 12–17): `pgsocket sock` at 0, `SockAddr laddr` at 16, `raddr` at 152
/// (`SockAddr` is a 128-byte `sockaddr_storage` and a `socklen_t`, 8-aligned).
const LADDR: usize = 16;
const RADDR: usize = hook::PORT_RADDR as usize;
use hook::{AF_INET, AF_INET6, AF_UNIX};

impl PortInfo {
    pub fn parse(port: &[u8]) -> Option<Self> {
        let fd = i32::from_ne_bytes(port.get(0..4)?.try_into().ok()?);
        let addr = |at: usize| -> Option<Option<SocketAddr>> {
            let family = u16::from_ne_bytes(port.get(at..at + 2)?.try_into().ok()?);
            let num = u16::from_be_bytes(port.get(at + 2..at + 4)?.try_into().ok()?);
            Some(match family {
                AF_INET => {
                    let ip: [u8; 4] = port.get(at + 4..at + 8)?.try_into().ok()?;
                    Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), num))
                }
                AF_INET6 => {
                    let ip: [u8; 16] = port.get(at + 8..at + 24)?.try_into().ok()?;
                    Some(SocketAddr::new(super::unmapped(Ipv6Addr::from(ip)), num))
                }
                AF_UNIX => None,
                _ => return None,
            })
        };
        Some(Self {
            socket_fd: fd,
            client: addr(RADDR)?,
            server: addr(LADDR)?,
        })
    }
}

#[derive(Debug)]
struct BackendStream {
    flow: Flow,
    port: Option<PortInfo>,
    transport: Transport,
    /// The SYN went to the wire stage.
    opened: bool,
    mid_stream: bool,
    /// Next wire-stage offset of each direction.
    client_offset: u64,
    server_offset: u64,
    /// Read-stream bytes not given to the wire stage (SSLRequest,
    /// GSSENCRequest): the program's positions run ahead by this much.
    skipped: u64,
}

/// Every hooked backend's synthetic connection.
#[derive(Debug, Default)]
pub struct BackendStreams {
    streams: HashMap<u32, BackendStream>,
    /// Encryption announced before the backend's first read (the request
    /// for its session probes): its transport once it is opened.
    encrypted: HashMap<u32, Transport>,
    /// `CLOCK_MONOTONIC` → Unix time.
    clock_offset: i64,
}

/// The synthetic name of a hooked session.
fn local_flow(pid: u32) -> Flow {
    let [a, b, c, d] = pid.to_be_bytes();
    Flow {
        client: SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(
                0,
                0,
                0,
                0,
                0,
                0,
                u16::from_be_bytes([a, b]),
                u16::from_be_bytes([c, d]),
            )),
            0,
        ),
        server: SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

/// An SSLRequest or GSSENCRequest and nothing else.
fn is_negotiation(bytes: &[u8]) -> bool {
    bytes.len() == 8
        && u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) == 8
        && matches!(
            u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            SSL_REQUEST | GSSENC_REQUEST
        )
}

impl BackendStreams {
    pub fn new(clock_offset: i64) -> Self {
        Self {
            streams: HashMap::default(),
            encrypted: HashMap::default(),
            clock_offset,
        }
    }

    /// The synthetic connection of a backend, if it is followed.
    pub fn flow_of(&self, pid: u32) -> Option<Flow> {
        self.streams.get(&pid).map(|s| s.flow)
    }

    /// Stops following a backend (another capture point owns its session).
    pub fn disown(&mut self, pid: u32) {
        self.streams.remove(&pid);
    }

    /// Turns one record into pipeline steps. `read_port` reads a backend's
    /// `Port` for a backend first seen in this agent's life after its start.
    pub fn steps(
        &mut self,
        r: HookRecord,
        read_port: impl FnOnce(u32, u64) -> Option<PortInfo>,
    ) -> Vec<BackendStep> {
        let at: UnixNanos = r.ts_ns as i64 + self.clock_offset;
        let mut steps = Vec::new();
        match r.kind {
            HookKind::Opened => {
                let port = PortInfo::parse(&r.bytes);
                let mut stream = new_stream(r.pid, port, r.mid_stream);
                if let Some(transport) = self.encrypted.remove(&r.pid) {
                    stream.transport = transport;
                }
                self.streams.insert(r.pid, stream);
            }
            HookKind::Tls | HookKind::Gss => {
                let transport = if r.kind == HookKind::Tls {
                    Transport::Tls
                } else {
                    Transport::Gss
                };
                match self.streams.get_mut(&r.pid) {
                    Some(s) => s.transport = transport,
                    // Its probes were attached for it: the first read comes next.
                    None => {
                        self.encrypted.insert(r.pid, transport);
                    }
                }
            }
            // Served by the hook (its probes attached); its reads follow.
            HookKind::Unix | HookKind::Session => {}
            HookKind::Read | HookKind::Write => {
                let s = self.streams.entry(r.pid).or_insert_with(|| {
                    // Running before this agent started: read its Port now.
                    new_stream(r.pid, read_port(r.pid, r.port), true)
                });
                let to_server = r.kind == HookKind::Read;
                let opening = !s.opened;
                if opening {
                    if to_server && !s.mid_stream && is_negotiation(&r.bytes) {
                        s.skipped = r.stream_offset + r.bytes.len() as u64;
                        if r.stopped {
                            steps.push(BackendStep::Stopped(stopped(r.pid, s, r.addr, 0)));
                        }
                        return steps;
                    }
                    open(r.pid, s, at, &mut steps);
                }
                let announce_after = opening && s.mid_stream;
                // Where the program says these bytes are: a record lost in
                // between shows as a gap in the wire stage, never a splice.
                let at_offset = if to_server {
                    r.stream_offset.saturating_sub(s.skipped)
                } else {
                    r.stream_offset
                };
                if to_server {
                    s.client_offset = at_offset;
                } else {
                    s.server_offset = at_offset;
                }
                if to_server && r.stopped {
                    let len = r.bytes.len() as u64;
                    steps.push(BackendStep::Stopped(stopped(r.pid, s, r.addr, len)));
                }
                let (direction, offset) = if to_server {
                    (Direction::ToServer, &mut s.client_offset)
                } else {
                    (Direction::FromServer, &mut s.server_offset)
                };
                let offset_now = *offset;
                *offset += r.bytes.len() as u64;
                steps.push(BackendStep::Segment(Segment {
                    flow: s.flow,
                    direction,
                    // Offset 0 is the byte after the SYN (sequence number 0).
                    seq: (offset_now as u32).wrapping_add(1),
                    tcp_flags: ACK,
                    at,
                    payload: r.bytes,
                    truncated: r.truncated,
                    held: false,
                    refused: false,
                    tcp_header: Vec::new(),
                }));
                if announce_after {
                    // Mid-stream: the wire stage knows the connection only now.
                    steps.push(hooked(r.pid, s));
                }
            }
            // For discovery, not for the wire stage.
            HookKind::PostmasterStarted => {}
            HookKind::Exited => {
                self.encrypted.remove(&r.pid);
                let flow = self.streams.remove(&r.pid).map(|s| {
                    if s.opened {
                        for (direction, offset) in [
                            (Direction::ToServer, s.client_offset),
                            (Direction::FromServer, s.server_offset),
                        ] {
                            steps.push(BackendStep::Segment(control(
                                s.flow,
                                direction,
                                (offset as u32).wrapping_add(1),
                                FIN | ACK,
                                at,
                            )));
                        }
                    }
                    s.flow
                });
                steps.push(BackendStep::Exited { pid: r.pid, flow });
            }
        }
        steps
    }
}

fn new_stream(pid: u32, port: Option<PortInfo>, mid_stream: bool) -> BackendStream {
    let transport = match port {
        Some(PortInfo {
            client: Some(_), ..
        }) if !mid_stream => Transport::Tcp,
        Some(PortInfo { client: None, .. }) => Transport::Unix,
        // TLS or not cannot be told mid-stream; no Port: nothing known.
        _ => Transport::Unknown,
    };
    BackendStream {
        flow: local_flow(pid),
        port,
        transport,
        opened: false,
        mid_stream,
        client_offset: 0,
        server_offset: 0,
        skipped: 0,
    }
}

fn stopped(pid: u32, s: &BackendStream, addr: u64, len: u64) -> StoppedRead {
    StoppedRead {
        pid,
        flow: s.flow,
        addr,
        start: s.client_offset,
        end: s.client_offset + len,
        socket_fd: s.port.map(|p| p.socket_fd),
    }
}

/// The connection's opening: a SYN each way (none for a session first seen
/// mid-stream, which the wire stage then picks up as such).
fn open(pid: u32, s: &mut BackendStream, at: UnixNanos, steps: &mut Vec<BackendStep>) {
    s.opened = true;
    if s.mid_stream {
        return;
    }
    steps.push(BackendStep::Segment(control(
        s.flow,
        Direction::ToServer,
        0,
        SYN,
        at,
    )));
    steps.push(BackendStep::Segment(control(
        s.flow,
        Direction::FromServer,
        0,
        SYN | ACK,
        at,
    )));
    steps.push(hooked(pid, s));
}

fn hooked(pid: u32, s: &BackendStream) -> BackendStep {
    BackendStep::Hooked {
        flow: s.flow,
        pid,
        transport: s.transport,
        client: s.port.and_then(|p| p.client),
        server: s.port.and_then(|p| p.server),
    }
}

fn control(flow: Flow, direction: Direction, seq: u32, tcp_flags: u8, at: UnixNanos) -> Segment {
    Segment {
        flow,
        direction,
        seq,
        tcp_flags,
        at,
        payload: Vec::new(),
        truncated: false,
        held: false,
        refused: false,
        tcp_header: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: HookKind, bytes: &[u8], stopped: bool) -> HookRecord {
        at(kind, bytes, stopped, 0)
    }

    fn at(kind: HookKind, bytes: &[u8], stopped: bool, stream_offset: u64) -> HookRecord {
        HookRecord {
            ts_ns: 1,
            pid: 4242,
            kind,
            addr: 0x1000,
            port: 0x2000,
            stream_offset,
            bytes: bytes.to_vec(),
            stopped,
            truncated: false,
            mid_stream: false,
            candidate: false,
        }
    }

    fn unix_port() -> Vec<u8> {
        let mut port = vec![0u8; 288];
        port[0..4].copy_from_slice(&9i32.to_ne_bytes());
        port[LADDR..LADDR + 2].copy_from_slice(&AF_UNIX.to_ne_bytes());
        port[RADDR..RADDR + 2].copy_from_slice(&AF_UNIX.to_ne_bytes());
        port
    }

    fn tcp_port() -> Vec<u8> {
        let mut port = vec![0u8; 288];
        port[0..4].copy_from_slice(&11i32.to_ne_bytes());
        for (at, ip, num) in [
            (LADDR, [10, 0, 0, 1], 5432u16),
            (RADDR, [10, 0, 0, 2], 40000),
        ] {
            port[at..at + 2].copy_from_slice(&AF_INET.to_ne_bytes());
            port[at + 2..at + 4].copy_from_slice(&num.to_be_bytes());
            port[at + 4..at + 8].copy_from_slice(&ip);
        }
        port
    }

    #[test]
    fn a_tls_session_keeps_its_addresses_and_skips_the_ssl_request() {
        let mut streams = BackendStreams::new(0);
        assert!(streams
            .steps(record(HookKind::Opened, &tcp_port(), false), |_, _| None)
            .is_empty());
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert!(streams
            .steps(record(HookKind::Read, &ssl, false), |_, _| None)
            .is_empty());
        streams.steps(record(HookKind::Tls, &[], false), |_, _| None);
        let steps = streams.steps(at(HookKind::Read, b"startup", true, 8), |_, _| None);
        assert_eq!(streams.flow_of(4242), Some(local_flow(4242)));
        match &steps[2] {
            BackendStep::Hooked {
                transport,
                client,
                server,
                ..
            } => {
                assert_eq!(*transport, Transport::Tls);
                assert_eq!(*client, Some("10.0.0.2:40000".parse().unwrap()));
                assert_eq!(*server, Some("10.0.0.1:5432".parse().unwrap()));
            }
            other => panic!("expected the session's announcement, got {other:?}"),
        }
        match &steps[3] {
            BackendStep::Stopped(s) => {
                assert_eq!((s.start, s.end, s.socket_fd), (0, 7, Some(11)));
            }
            other => panic!("expected the stopped read, got {other:?}"),
        }
        match &steps[4] {
            BackendStep::Segment(seg) => assert_eq!((seg.seq, seg.payload.len()), (1, 7)),
            other => panic!("expected the read's segment, got {other:?}"),
        }
    }

    #[test]
    fn a_unix_session_gets_a_private_name_and_closes_when_the_backend_exits() {
        let mut streams = BackendStreams::new(0);
        streams.steps(record(HookKind::Opened, &unix_port(), false), |_, _| None);
        let steps = streams.steps(record(HookKind::Read, b"abc", false), |_, _| None);
        assert!(matches!(
            &steps[2],
            BackendStep::Hooked {
                transport: Transport::Unix,
                ..
            }
        ));
        let flow = streams.flow_of(4242).expect("followed");
        assert_eq!(flow, local_flow(4242));
        let steps = streams.steps(at(HookKind::Read, b"defg", false, 3), |_, _| None);
        match &steps[0] {
            BackendStep::Segment(seg) => assert_eq!(seg.seq, 4),
            other => panic!("{other:?}"),
        }
        // A record the ring lost (bytes 7..10): the next one lands where the
        // program says, so the wire stage sees a gap, not a splice.
        let steps = streams.steps(at(HookKind::Read, b"hij", false, 10), |_, _| None);
        match &steps[0] {
            BackendStep::Segment(seg) => assert_eq!(seg.seq, 11),
            other => panic!("{other:?}"),
        }
        let steps = streams.steps(record(HookKind::Exited, &[], false), |_, _| None);
        assert_eq!(steps.len(), 3);
        match &steps[0] {
            BackendStep::Segment(seg) => assert!(seg.is_fin() && seg.seq == 14),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            steps[2],
            BackendStep::Exited {
                pid: 4242,
                flow: Some(_)
            }
        ));
        assert!(streams.flow_of(4242).is_none());
    }

    #[test]
    fn a_backend_first_seen_mid_stream_is_opened_without_a_syn() {
        let mut streams = BackendStreams::new(0);
        let steps = streams.steps(record(HookKind::Read, b"Q\0\0\0\x05x", true), |_, _| {
            PortInfo::parse(&tcp_port())
        });
        assert!(matches!(&steps[0], BackendStep::Stopped(_)));
        assert!(matches!(&steps[1], BackendStep::Segment(s) if !s.is_syn()));
        assert!(matches!(
            &steps[2],
            BackendStep::Hooked {
                transport: Transport::Unknown,
                ..
            }
        ));
    }
}
