//! What the gate keeps of one connection, in one record
//! ([`GatedConnection`]): made by the first thing the gate learns of the
//! connection, emptied part by part as its holds end, and dropped in one
//! place (`Gate::tidy`) when nothing of it is left.
use std::time::Instant;

use super::{
    held::{self, HeldStream},
    judge::Lexing,
    SqlInfo,
};
use crate::{
    capture::backend::StoppedRead,
    flow::{GateMode, Transport},
    policy::Subject,
    wire::{ClientMessage, ConnId},
};

/// What the policy knows of an identified session.
#[derive(Clone, Debug, Default)]
pub(super) struct ConnInfo {
    pub conn: ConnId,
    pub subject: Subject,
    pub refused: bool,
    /// StartupMessage settings beyond the identity (judged as `SET`s).
    pub settings: Vec<(String, String)>,
    /// The policy's mode for it (the kernel may be told a stricter one).
    pub mode: Option<GateMode>,
    /// How the server reads this session's text, as far as qgate can model it.
    pub lexing: Lexing,
    /// A statement that may change the schema ran in the transaction still
    /// open: its uncommitted objects are invisible to the catalog reader.
    pub schema_changed: bool,
    /// The agent's own catalog session (its one-time token was presented).
    pub own: bool,
    /// A schema change ran in the transaction still open: the catalog is
    /// read again once it ends.
    pub catalog_stale: bool,
    /// A `SET search_path` (or similar) ran: table names may resolve
    /// elsewhere than in the estimator's session.
    pub search_path_changed: bool,
    /// The mode the kernel was last told.
    pub kernel_mode: Option<GateMode>,
}

/// A session the server hook reads.
#[derive(Clone, Copy, Debug)]
pub(super) struct HookedSession {
    pub pid: u32,
    /// `None` for a Unix socket.
    pub client: Option<std::net::SocketAddr>,
    pub transport: Transport,
}

/// A read after which the server hook stopped the backend.
#[derive(Debug)]
pub(super) enum BackendRead {
    /// The wire stage is decoding its messages; `broken` once it could not
    /// decode them whole.
    Decoding { read: StoppedRead, broken: bool },
    /// Decoded; waits for its database's catalog or a planner's estimate.
    Deferred {
        read: StoppedRead,
        messages: Vec<ClientMessage>,
    },
}

impl BackendRead {
    pub fn pid(&self) -> u32 {
        match self {
            BackendRead::Decoding { read, .. } | BackendRead::Deferred { read, .. } => read.pid,
        }
    }
}

/// Bytes the agent re-injected that the server has not acknowledged yet, as
/// far as the agent knows (the tc egress program's `server_ack`): what is
/// sent again when the client's own copy of them is refused.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Delivered {
    pub seq: u32,
    pub bytes: Vec<u8>,
    /// When they were last sent again: at most once per
    /// `REDELIVER_EVERY`, however many copies a client (or someone forging
    /// its segments) sends.
    pub redelivered_at: Option<Instant>,
}

impl Delivered {
    pub fn end(&self) -> u32 {
        self.seq.wrapping_add(self.bytes.len() as u32)
    }

    /// Bytes re-injected at `seq`: appended when they follow the kept ones,
    /// in their place otherwise (an earlier release was acknowledged or
    /// the stream moved on).
    pub fn add(&mut self, seq: u32, bytes: &[u8]) {
        if self.bytes.is_empty() || seq != self.end() {
            self.seq = seq;
            self.bytes.clear();
        }
        self.bytes.extend_from_slice(bytes);
    }

    /// The server acknowledged every byte before `ack`.
    pub fn acknowledged(&mut self, ack: u32) {
        if !held::seq_lt(self.seq, ack) {
            return;
        }
        if !held::seq_lt(ack, self.end()) {
            self.bytes.clear();
            self.seq = ack;
            return;
        }
        self.bytes.drain(..ack.wrapping_sub(self.seq) as usize);
        self.seq = ack;
    }

    /// Whether `[seq, seq + len)` overlaps the kept bytes.
    pub fn overlaps(&self, seq: u32, len: usize) -> bool {
        let end = seq.wrapping_add(len as u32);
        !self.bytes.is_empty() && held::seq_lt(seq, self.end()) && held::seq_lt(self.seq, end)
    }
}

/// Everything the gate keeps of one connection.
#[derive(Default)]
pub(super) struct GatedConnection {
    /// Set once the wire stage has identified the session.
    pub info: Option<ConnInfo>,
    /// Held bytes and undecided messages (the tc path), while there are any.
    pub held: Option<HeldStream<SqlInfo>>,
    /// When the last held copy arrived.
    pub last_copy: Option<Instant>,
    /// End of the bytes last re-injected: a held copy from before it was
    /// dropped before the release took effect and is stale (the server has
    /// those bytes).
    pub released_until: Option<u32>,
    /// What was re-injected and not acknowledged yet.
    pub delivered: Option<Delivered>,
    /// Read inside the server by the hook.
    pub hook: Option<HookedSession>,
    /// The server hook stopped its backend after a read.
    pub read: Option<BackendRead>,
    /// Connected before its server became gated: the wire path gates it;
    /// the backend's pid.
    pub before_hook: Option<u32>,
}

impl GatedConnection {
    /// Nothing of the connection is left to keep.
    pub fn is_empty(&self) -> bool {
        self.info.is_none()
            && self.held.is_none()
            && self.released_until.is_none()
            && self.delivered.is_none()
            && self.hook.is_none()
            && self.read.is_none()
            && self.before_hook.is_none()
    }

    /// The part of a held copy at `seq` that was not re-injected already;
    /// `None` when all of it was (a stale copy).
    pub fn unreleased<'a>(&self, seq: u32, payload: &'a [u8]) -> Option<(u32, &'a [u8])> {
        let Some(until) = self.released_until else {
            return Some((seq, payload));
        };
        let end = seq.wrapping_add(payload.len() as u32);
        if !held::seq_lt(until, end) {
            return None;
        }
        if held::seq_lt(seq, until) {
            return Some((until, &payload[until.wrapping_sub(seq) as usize..]));
        }
        Some((seq, payload))
    }

    /// Bytes up to `end` were re-injected.
    pub fn released(&mut self, end: u32) {
        let later = self
            .released_until
            .is_none_or(|until| held::seq_lt(until, end));
        if later {
            self.released_until = Some(end);
        }
    }

    /// The held stream ended (released whole, refused, or reset).
    pub fn drop_held(&mut self) -> Option<HeldStream<SqlInfo>> {
        self.last_copy = None;
        self.held.take()
    }

    /// The wire stage saw the connection end: what only a live session
    /// needs goes. Held bytes stay until their request's final event
    /// settles them, the hook's session until its backend exits, a stopped
    /// read until it is decided.
    pub fn closed(&mut self) {
        self.info = None;
        self.before_hook = None;
        self.released_until = None;
        self.delivered = None;
        if matches!(self.read, Some(BackendRead::Deferred { .. })) {
            self.read = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_of_released_bytes_is_stale_and_a_straddling_one_is_trimmed() {
        let mut c = GatedConnection::default();
        assert_eq!(c.unreleased(100, b"abcd"), Some((100, &b"abcd"[..])));
        c.released(102);
        assert_eq!(c.unreleased(100, b"ab"), None, "all of it re-injected");
        assert_eq!(c.unreleased(100, b"abcd"), Some((102, &b"cd"[..])));
        assert_eq!(c.unreleased(102, b"cd"), Some((102, &b"cd"[..])));
        // An earlier release point never moves it back.
        c.released(101);
        assert_eq!(c.unreleased(100, b"ab"), None);
        // Across the sequence-number wrap.
        let mut c = GatedConnection::default();
        c.released(3);
        assert_eq!(c.unreleased(u32::MAX - 1, b"abcdef"), Some((3, &b"f"[..])));
    }

    #[test]
    fn delivered_bytes_follow_releases_and_acknowledgments() {
        let mut d = Delivered::default();
        assert!(!d.overlaps(0, 10), "nothing kept");
        d.add(100, b"abcd");
        d.add(104, b"ef");
        assert_eq!(
            (d.seq, &d.bytes[..]),
            (100, &b"abcdef"[..]),
            "contiguous: appended"
        );
        assert!(d.overlaps(105, 1) && d.overlaps(90, 11) && !d.overlaps(90, 10));
        assert!(!d.overlaps(106, 5), "past the end");
        d.acknowledged(99);
        assert_eq!(d.seq, 100, "an older acknowledgment changes nothing");
        d.acknowledged(103);
        assert_eq!((d.seq, &d.bytes[..]), (103, &b"def"[..]));
        d.add(200, b"xy");
        assert_eq!(
            (d.seq, &d.bytes[..]),
            (200, &b"xy"[..]),
            "not contiguous: replaced"
        );
        d.acknowledged(500);
        assert!(
            d.bytes.is_empty() && !d.overlaps(200, 2),
            "all acknowledged"
        );
        // Across the sequence-number wrap.
        let mut d = Delivered::default();
        d.add(u32::MAX - 1, b"abcd");
        assert!(d.overlaps(1, 1));
        d.acknowledged(1);
        assert_eq!((d.seq, &d.bytes[..]), (1, &b"d"[..]));
    }

    #[test]
    fn a_record_with_nothing_left_is_empty_and_closing_keeps_what_still_waits() {
        let mut c = GatedConnection {
            info: Some(ConnInfo::default()),
            held: Some(HeldStream::new(7)),
            ..GatedConnection::default()
        };
        c.closed();
        assert!(c.info.is_none());
        assert!(!c.is_empty(), "held bytes wait for their request's end");
        assert!(c.drop_held().is_some());
        assert!(c.is_empty());
    }
}
