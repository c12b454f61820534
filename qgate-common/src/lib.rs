//! Types shared by qgate's tc programs (`qgate-ebpf`) and its agent.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel writes it into maps
//! and the ring buffer, the agent reads the same bytes. Changing a layout
//! changes [`ABI_VERSION`], which names the pinned maps, so an agent never
//! reads maps written by a program with another layout.
#![no_std]

/// Bumped on every change of a shared layout or map; part of pinned names.
pub const ABI_VERSION: u32 = 1;

/// `SO_MARK` value on packets the agent re-injects; the tc program passes
/// them untouched so a released statement is not held a second time.
pub const QGATE_MARK: u32 = 0x7167_0001; // "qg" + 1

/// Map names, as the agent looks them up in the loaded object.
pub mod maps {
    /// Ring buffer of [`super::SegmentEvent`] + payload chunk.
    pub const SEGMENTS: &str = "SEGMENTS";
    /// `HashMap<u16 (host order), u8>`: TCP ports that carry database traffic.
    pub const DB_PORTS: &str = "DB_PORTS";
    /// `LruHashMap<FlowKey, FlowState>`: gating state per connection.
    pub const FLOWS: &str = "FLOWS";
    /// `Array<GateConfig>` of one: defaults and the agent's heartbeat.
    pub const GATE_CONFIG: &str = "GATE_CONFIG";
    /// Per-CPU array of [`super::Counters`] at index 0.
    pub const COUNTERS: &str = "COUNTERS";
}

/// Payload bytes carried by one ring-buffer record of the large class.
pub const CHUNK_LARGE: usize = 4096;
/// Payload bytes carried by one ring-buffer record of the small class; most
/// queries and most server answers fit, and they cost a 16th of the ring.
pub const CHUNK_SMALL: usize = 256;
/// A segment longer than `CHUNK_LARGE * MAX_CHUNKS` is reported truncated
/// (GSO super-packets on veth reach 64 KiB; BIG TCP is not expected here).
pub const MAX_CHUNKS: usize = 17;

/// Direction of a segment relative to the database server.
pub const DIR_TO_SERVER: u8 = 0;
pub const DIR_FROM_SERVER: u8 = 1;

/// `SegmentEvent::flags` bits.
pub mod flags {
    /// The tc program could not copy the whole payload: the agent must treat
    /// the stream as broken from this sequence number on (fail closed).
    pub const TRUNCATED: u32 = 1 << 0;
    /// The program dropped this segment: it waits for the agent's decision
    /// and only reaches the server if the agent re-injects it.
    pub const HELD: u32 = 1 << 1;
}

/// Per-connection gating modes (`FlowState::mode`, `GateConfig::default_mode`).
pub mod mode {
    /// Never hold; capture only.
    pub const MONITOR: u8 = 0;
    /// Hold SQL-bearing messages the program cannot prove to be a single plain read.
    pub const GATE_RISKY: u8 = 1;
    /// Hold every SQL-bearing message for a decision.
    pub const GATE_ALL: u8 = 2;
    /// Hold everything: the agent refuses the connection.
    pub const DENY: u8 = 3;
}

/// Where a connection's client→server stream is, as far as the program knows.
pub mod phase {
    /// SYN seen; the next payload is a StartupMessage, SSLRequest, GSSENCRequest or CancelRequest.
    pub const STARTUP: u8 = 0;
    /// Message boundaries known: the next message header is at `next_msg_seq`.
    pub const READY: u8 = 1;
    /// Start not seen (connection older than the program): the agent must sync it.
    pub const UNSYNCED: u8 = 2;
    /// TLS or GSS encryption: nothing to read.
    pub const OPAQUE: u8 = 3;
}

/// Gating state of one connection. The program creates it on SYN (or on the
/// first segment of a connection it did not see start) and advances
/// `next_msg_seq`; the agent writes it when it releases held bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// Sequence number of the next message header (`phase::READY`).
    pub next_msg_seq: u32,
    /// While `held`: every payload byte at or after this waits for the agent.
    pub hold_seq: u32,
    /// Originals of a denied statement, `[deny_start, deny_end)`: never let
    /// through, even as a retransmission, once the rewritten copy was sent.
    pub deny_start: u32,
    pub deny_end: u32,
    pub mode: u8,
    pub phase: u8,
    pub held: u8,
    pub _pad: u8,
}

/// Settings the agent writes; read by the program on every gated segment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateConfig {
    /// `CLOCK_MONOTONIC` ns of the agent's last heartbeat (0: never).
    pub heartbeat_ns: u64,
    /// The agent counts as gone when its heartbeat is older than this.
    pub fail_after_ns: u64,
    /// Mode of a connection whose identity the agent has not judged yet.
    pub default_mode: u8,
    /// 1: when the agent is gone, pass everything (and count it); 0: hold.
    pub fail_open: u8,
    /// 1: hold each StartupMessage until the agent has judged the identity.
    pub hold_startup: u8,
    pub _pad: [u8; 5],
}

/// A TCP connection as seen from the database server: who called whom.
/// Addresses are IPv6 or IPv4-mapped IPv6 (`::ffff:a.b.c.d`), network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub client_addr: [u8; 16],
    pub server_addr: [u8; 16],
    /// Host order.
    pub client_port: u16,
    /// Host order.
    pub server_port: u16,
}

/// Header of one ring-buffer record: one chunk of one TCP segment.
/// `chunk_len` payload bytes follow the header in the record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SegmentEvent {
    /// `bpf_ktime_get_ns` when the program saw the segment.
    pub ts_ns: u64,
    pub flow: FlowKey,
    /// TCP sequence number of the segment's first payload byte.
    pub seq: u32,
    pub ack: u32,
    /// Total TCP payload length of the segment (all chunks).
    pub payload_len: u32,
    /// Offset of this chunk within the segment's payload.
    pub chunk_offset: u32,
    pub chunk_len: u32,
    pub ifindex: u32,
    pub flags: u32,
    /// [`DIR_TO_SERVER`] or [`DIR_FROM_SERVER`].
    pub direction: u8,
    /// TCP flag byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10).
    pub tcp_flags: u8,
    /// Length of the TCP header copied into `tcp_header` (20..=60).
    pub tcp_header_len: u8,
    pub _pad: [u8; 5],
    /// The segment's TCP header, options included: a held segment is
    /// re-injected with its own timestamps and window.
    pub tcp_header: [u8; 64],
}

/// TCP flag bits of the header's 13th byte (RFC 9293 §3.1).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
}

/// A ring-buffer record with room for `N` payload bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SegmentRecord<const N: usize> {
    pub header: SegmentEvent,
    pub data: [u8; N],
}

/// Counters the tc programs keep, one copy per CPU; the agent sums them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Segments to or from a DB port that were looked at.
    pub segments_seen: u64,
    /// Records that could not be reserved in the ring buffer: capture loss.
    pub ringbuf_full: u64,
    /// Segments longer than the program copies (`flags::TRUNCATED` sent).
    pub truncated: u64,
    /// Payload bytes a `bpf_skb_load_bytes` failed to copy.
    pub load_errors: u64,
    /// Segments dropped to wait for a decision (including retransmissions).
    pub held: u64,
    /// Gated segments passed because the agent was gone and `fail_open` is set.
    pub failed_open: u64,
}

impl Counters {
    /// Loss of any kind: when non-zero, some statement was not seen whole.
    pub fn lost(&self) -> u64 {
        self.ringbuf_full + self.truncated + self.load_errors
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `repr(C)` data with no padding holes read as anything else.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::SegmentEvent {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::GateConfig {}
}
