//! Types shared by qgate's tc programs (`qgate-ebpf`) and its agent.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel writes it into maps
//! and the ring buffer, the agent reads the same bytes. Changing a layout
//! changes [`ABI_VERSION`], which names the pinned maps, so an agent never
//! reads maps written by a program with another layout.
#![no_std]

/// Bumped on every change of a shared layout or map; part of pinned names.
pub const ABI_VERSION: u32 = 7;

/// `SO_MARK` value on packets the agent re-injects; the tc program passes
/// them untouched so a released statement is not held a second time.
pub const QGATE_MARK: u32 = 0x7167_0001; // "qg" + 1

pub mod scan;

/// Map names, as the agent looks them up in the loaded object.
pub mod maps {
    /// Ring buffer of [`super::SegmentEvent`] + payload chunk.
    pub const SEGMENTS: &str = "SEGMENTS";
    /// `HashMap<u16 (host order), u8>`: TCP ports that carry database
    /// traffic, with a [`super::port_kind`] value.
    pub const DB_PORTS: &str = "DB_PORTS";
    /// `LruHashMap<FlowKey, FlowState>`: gating state per connection.
    pub const FLOWS: &str = "FLOWS";
    /// `Array<GateConfig>` of one: defaults and the agent's heartbeat.
    pub const GATE_CONFIG: &str = "GATE_CONFIG";
    /// Per-CPU array of [`super::Counters`] at index 0.
    pub const COUNTERS: &str = "COUNTERS";
    /// Ring buffer of [`super::HookEvent`] + bytes: what the server hook saw.
    pub const HOOK_EVENTS: &str = "HOOK_EVENTS";
    /// `LruHashMap<u32 (tgid), BackendState>`: per PostgreSQL backend.
    pub const BACKENDS: &str = "BACKENDS";
    /// `LruHashMap<u32 (tgid), u8>`: a backend's gating mode, written by the
    /// agent only (the program's own `BackendState` is never written back
    /// while the backend runs: that would race with its walk).
    pub const BACKEND_MODES: &str = "BACKEND_MODES";
    /// `Array<ManagedServer>` of [`super::MAX_MANAGED_SERVERS`]: the postmasters gated.
    pub const MANAGED_SERVERS: &str = "MANAGED_SERVERS";
    /// `LruHashMap<u32 (tgid), u8>`: backends that asked for the session
    /// probes (`hook::UNIX`, `TLS`, `GSS`, `SESSION`), with
    /// `hook::PID_AWAITING` / `PID_STOPPED` until the agent attached them.
    pub const HOOK_PIDS: &str = "HOOK_PIDS";
}

/// `DB_PORTS` values.
pub mod port_kind {
    /// The tc programs capture and gate every connection.
    pub const WIRE: u8 = 1;
    /// The server hook reads this port's server: the tc programs gate its
    /// plaintext sessions as on a `WIRE` port, and leave to the hook a
    /// session whose server accepted TLS or GSSAPI encryption (its backend
    /// is probed from `secure_open_server` / `secure_open_gssapi` on).
    pub const HOOKED: u8 = 2;
    /// MySQL/MariaDB (`capture.mysql_ports`): captured both ways and
    /// gated. The program walks one command packet per segment
    /// (`walk::mysql_packet`) and passes on its own only what it proves
    /// harmless; every other client byte waits for the agent, which
    /// decodes and decides each packet (the PostgreSQL walk never runs on
    /// these bytes).
    pub const MYSQL: u8 = 3;
    /// The server hook reads every session of this port's server
    /// (`server_hook.probes = "every-backend"`): connections that start
    /// from now on are left to it; older ones stay on the wire path.
    pub const HOOKED_ALL: u8 = 4;
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
    /// The program dropped this segment as a new copy of bytes already let
    /// through that the server has not acknowledged (`refused_segments`).
    /// It never reaches the server and is not part of the stream; the agent
    /// re-delivers its own judged copy of those bytes if it has one: the
    /// server may have lost the copy the agent re-injected (an old
    /// timestamp, a full receive buffer), and without it the connection
    /// would wait forever.
    pub const REFUSED: u32 = 1 << 2;
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
    /// Encrypted on a port the server hook reads (the server said `S` or
    /// `G`): the hook reads it in plain; passed without capture but for
    /// its FIN and RST.
    pub const HOOKED: u8 = 4;
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
    /// While `held`: 1 when only the end of a long message is held
    /// (`hold_seq` is its tail) and the bytes before it pass in order.
    pub tail: u8,
    /// The client's initial sequence number (its SYN's): the same SYN again
    /// is a retransmission; another one on the live flow is not trusted.
    pub isn: u32,
    /// While `tail`: end of the in-order bytes passed so far. A segment
    /// beyond it (a hole before it) is dropped, as if lost: the server's
    /// reassembly of out-of-order overlaps need not match the agent's, so
    /// past a hole the server gets nothing until the client fills it.
    pub pass_until: u32,
    /// The highest acknowledgment the server has sent (tc egress): bytes
    /// before it are in the server's hands, and a copy of them arriving
    /// again is discarded by its TCP whatever it holds.
    pub server_ack: u32,
    /// End of the client bytes this program let through.
    pub passed_end: u32,
    /// `known::*` bits: which of `server_ack` and `passed_end` are set.
    pub known: u8,
    /// MySQL: 1 when the agent saw the session from its login, so every
    /// statement id the server hands out comes from a `COM_STMT_PREPARE`
    /// the agent judged (the program never passes one): its executes,
    /// fetches, long data, resets and closes pass.
    pub mysql_prepared_judged: u8,
    pub _pad: [u8; 2],
}

/// [`FlowState::known`] bits.
pub mod known {
    pub const SERVER_ACK: u8 = 1;
    pub const PASSED_END: u8 = 2;
    /// The server sent payload (tc egress, `port_kind::HOOKED` ports): its
    /// first, a lone `S` or `G`, hands the session to the server hook.
    pub const SERVER_SPOKE: u8 = 4;
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
    /// 1: hold the TLS handshake of a session whose server accepted TLS on
    /// the wire path: the agent refuses sessions it could not read
    /// (`gate.unreadable = "refuse"`).
    pub hold_encryption: u8,
    pub _pad: [u8; 4],
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
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
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
    /// Server hook: reads and writes of gated backends seen.
    pub hook_events: u64,
    /// Server hook: records that could not be reserved or copied (loss).
    pub hook_lost: u64,
    /// Server hook: backends stopped to wait for a decision.
    pub hook_stops: u64,
    /// Segments to a database port dropped because the server would read
    /// them differently from the capture: IP fragments (reassembled after
    /// tc), TCP urgent data (taken out of the stream by the receiver), and
    /// a new copy of bytes already let through that the server has not
    /// acknowledged (it may take the copy's bytes, never judged).
    pub refused_segments: u64,
}

impl Counters {
    /// Loss of any kind: when non-zero, some statement was not seen whole.
    pub fn lost(&self) -> u64 {
        self.ringbuf_full + self.truncated + self.load_errors + self.hook_lost
    }
}

/// The server hook: uprobes on PostgreSQL's `secure_read` / `secure_write`
/// (src/backend/libpq/be-secure.c), which see the bytes the backend parses
/// after TLS decryption, over TCP and Unix sockets alike.
pub mod hook {
    /// `HookEvent::kind`.
    pub const READ: u8 = 0;
    pub const WRITE: u8 = 1;
    /// First read of a backend: the record carries the first
    /// [`PORT_PREFIX`] bytes of its `Port` (socket, local and remote address).
    pub const OPENED: u8 = 2;
    /// `secure_open_server`: the session switched to TLS.
    pub const TLS: u8 = 3;
    /// `secure_open_gssapi`: the session switched to GSSAPI encryption.
    pub const GSS: u8 = 4;
    /// The backend process exited.
    pub const EXIT: u8 = 5;
    /// `PostmasterMain`: a PostgreSQL server is starting (the agent looks
    /// for it at once, before it accepts connections).
    pub const POSTMASTER: u8 = 6;
    /// `pq_init` of a backend whose client socket is a Unix socket: it
    /// waits (stopped) for the agent to attach the session probes to it.
    pub const UNIX: u8 = 7;
    /// `pq_init` of a backend whose socket the program could not tell (its
    /// server not registered yet, or its `Port` unreadable): it waits for
    /// the agent, which looks at the socket itself.
    pub const SESSION: u8 = 8;

    /// `HOOK_PIDS` value bits (the low bits are the kind that asked).
    /// The session probes are not attached yet.
    pub const PID_AWAITING: u8 = 0x80;
    /// The backend stopped itself until they are.
    pub const PID_STOPPED: u8 = 0x40;
    pub const PID_KIND: u8 = 0x3f;

    /// `HookEvent::flags`.
    /// The backend was sent SIGSTOP after this read: it waits for the agent.
    pub const STOPPED: u8 = 1 << 0;
    /// Bytes of this read or write were not delivered (loss: fail closed).
    pub const TRUNCATED: u8 = 1 << 1;
    /// The backend was first seen after its start (the agent was not running).
    pub const MID_STREAM: u8 = 1 << 2;
    /// `OPENED` of a process no gated postmaster is known to have forked:
    /// followed until the agent says whether its server is one it gates.
    pub const CANDIDATE: u8 = 1 << 3;
    /// The first write after a stop: the answer to a statement the agent
    /// decided (its ParameterStatus may change how the session's next
    /// statements read, so it wakes the agent at once).
    pub const ANSWER: u8 = 1 << 4;

    /// `struct Port` up to the end of `raddr` (sock, noblock, proto,
    /// laddr, raddr: 4 + 4 + 8 + 136 + 136, the same in PostgreSQL 12–17).
    pub const PORT_PREFIX: usize = 288;
    /// Offset of `raddr` (the client's `SockAddr`, its family first) in
    /// `struct Port` (PostgreSQL 12–17) and in PostgreSQL 17's
    /// `struct ClientSocket` (`pgsocket sock` then `SockAddr raddr`).
    pub const PORT_RADDR: u64 = 152;
    pub const CLIENT_SOCKET_RADDR: u64 = 8;
    /// `sa_family_t` values (Linux).
    pub const AF_UNIX: u16 = 1;
    pub const AF_INET: u16 = 2;
    pub const AF_INET6: u16 = 10;

    /// `BackendState::phase`.
    /// Before the StartupMessage: messages have no type byte.
    pub const STARTUP: u8 = 0;
    /// After it: type byte + Int32 length.
    pub const READY: u8 = 1;
    /// Not a backend of a gated server: never looked at again.
    pub const IGNORED: u8 = 2;
    /// Boundaries lost (a read could not be walked): every read waits.
    pub const LOST: u8 = 3;
}

/// How many postmasters one agent gates through the server hook.
pub const MAX_MANAGED_SERVERS: usize = 16;

/// A postmaster whose backends the hook gates. A backend is recognised by
/// the value of PostgreSQL's global `PostmasterPid`, which it inherits at
/// fork at the same address as its postmaster.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ManagedServer {
    /// Address of `PostmasterPid` in the postmaster (and its backends); 0: empty slot.
    pub pid_addr: u64,
    /// Address of `MyProcPort` (PostgreSQL 12–16 set it before calling
    /// `pq_init()`); 0 for PostgreSQL 17 on, whose `pq_init(ClientSocket *)`
    /// is handed the socket.
    pub port_var_addr: u64,
    pub postmaster_pid: u32,
    pub _pad: u32,
}

/// What the hook knows of one backend's client → server stream.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendState {
    /// Body bytes of the current message still to come.
    pub need: u32,
    /// Header bytes of the next message collected so far.
    pub hdr_have: u8,
    /// Type byte of the current message (0 in the startup phase).
    pub msg_type: u8,
    /// [`mode`] value until the agent judged the identity (see
    /// `maps::BACKEND_MODES`).
    pub mode: u8,
    /// [`hook`] phase.
    pub phase: u8,
    pub hdr: [u8; 8],
    /// 1 while the kernel stopped it and the agent has not resumed it.
    pub stopped: u8,
    /// 1: its postmaster was not known to be gated at first sight. It is
    /// followed but never stopped until the agent claims it (writes its
    /// mode into `maps::BACKEND_MODES`): an agent never holds a backend of
    /// a server that is not its own.
    pub candidate: u8,
    /// 1 from a stop to the next write (see `hook::ANSWER`).
    pub answer_due: u8,
    pub _pad: [u8; 5],
    /// Bytes read and written since the program first saw the backend: the
    /// position of each record, so a lost record is a gap, never a splice.
    pub read_bytes: u64,
    pub written_bytes: u64,
    /// The last `secure_write` sent whole at its entry: its buffer's start
    /// and end, to recognise the call that writes the rest of it after a
    /// partial write (a later start, the same end).
    pub write_at: u64,
    pub write_end: u64,
}

/// Header of one hook ring-buffer record; `chunk_len` bytes follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HookEvent {
    /// `bpf_ktime_get_ns`.
    pub ts_ns: u64,
    /// User address of the bytes read or written (the `Port` for `OPENED`).
    pub addr: u64,
    /// User address of the backend's `Port` (a restarted agent reads it).
    pub port: u64,
    /// Position of the first byte in the backend's read (or write) stream.
    pub stream_offset: u64,
    pub tgid: u32,
    /// Bytes of the whole read or write.
    pub len: u32,
    pub chunk_offset: u32,
    pub chunk_len: u32,
    /// [`hook`] kind.
    pub kind: u8,
    /// [`hook`] flags.
    pub flags: u8,
    pub _pad: [u8; 6],
}

/// A hook record with room for `N` bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HookRecord<const N: usize> {
    pub header: HookEvent,
    pub data: [u8; N],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `repr(C)` data with no padding holes read as anything else.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::SegmentEvent {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::GateConfig {}
    unsafe impl aya::Pod for super::ManagedServer {}
    unsafe impl aya::Pod for super::BackendState {}
    unsafe impl aya::Pod for super::HookEvent {}
}

/// TCP sequence-space arithmetic (RFC 9293 §3.4, modulo 2^32), used by the
/// kernel gate, the agent's reassembly and its held-segment book.
pub mod tcp {
    /// How far `seq` is past `from` in sequence space: negative when `seq`
    /// comes before it (a distance beyond 2^31 is read as a wrap).
    #[inline(always)]
    pub fn seq_delta(seq: u32, from: u32) -> i32 {
        seq.wrapping_sub(from) as i32
    }

    /// `a` before `b` in sequence space.
    #[inline(always)]
    pub fn seq_lt(a: u32, b: u32) -> bool {
        seq_delta(a, b) < 0
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn sequence_numbers_compare_across_the_wrap() {
            assert!(seq_lt(1, 2));
            assert!(!seq_lt(2, 2));
            assert!(seq_lt(u32::MAX - 10, 5), "5 comes after the wrap");
            assert!(!seq_lt(5, u32::MAX - 10));
            assert_eq!(seq_delta(5, u32::MAX - 10), 16);
            assert_eq!(seq_delta(u32::MAX - 10, 5), -16);
        }
    }
}

/// PostgreSQL protocol 3.0 facts both sides rely on ("Message Formats").
pub mod pg {
    /// Request codes in the Int32 after a startup packet's length.
    pub const SSL_REQUEST: u32 = 80_877_103;
    pub const GSSENC_REQUEST: u32 = 80_877_104;
    pub const CANCEL_REQUEST: u32 = 80_877_102;
    /// Protocol 3.0 in a StartupMessage.
    pub const PROTOCOL_3_0: u32 = 196_608;
    /// Longest startup packet the server accepts (`MAX_STARTUP_PACKET_LENGTH`).
    pub const MAX_STARTUP_LEN: u32 = 10_000;
    /// Largest length a message header may carry (`PQ_LARGE_MESSAGE_LIMIT`
    /// is 1 GiB - 1; the Int32 counts itself).
    pub const MAX_MESSAGE_LEN: u32 = (1 << 30) - 1;
}
