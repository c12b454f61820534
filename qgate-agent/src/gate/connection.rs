//! What the gate keeps of one connection, in one record
//! ([`GatedConnection`]): made by the first thing the gate learns of the
//! connection, emptied part by part as its holds end, and dropped in one
//! place (`Gate::tidy`) when nothing of it is left.
use std::{collections::VecDeque, time::Instant};

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
    /// The session changed what its statements mean in a way the
    /// estimator's session does not share: a PostgreSQL `SET search_path`
    /// (or similar: table names may resolve elsewhere), a MySQL `SET` of a
    /// variable that changes meaning (`time_zone`, `timestamp` …), a CALL
    /// or a text not understood. No row estimates from then on.
    pub session_changed: bool,
    /// The mode the kernel was last told.
    pub kernel_mode: Option<GateMode>,
    /// The server's grammar: MySQL/MariaDB sessions are judged with the
    /// MySQL dialect, without PostgreSQL's catalog or planner.
    pub dialect: crate::classify::Dialect,
    /// MySQL: the session was seen from its login, so every prepared
    /// statement in it went through the gate (see
    /// `FlowState::mysql_prepared_judged`).
    pub prepared_judged: bool,
    /// MySQL: a USE (or `COM_INIT_DB`) was let through and the server has
    /// not confirmed it yet: the session's database is unknown until then.
    pub database_pending: bool,
    /// MySQL: the last release left the kernel holding every byte
    /// (`phase::STARTUP`: a `COM_CHANGE_USER` or `LOCAL INFILE` was under
    /// way); `Gate::mysql_resume_walk` lets it walk again. Without it the
    /// agent would read the kernel's map at every statement's completion.
    pub walk_paused: bool,
}

/// A session the server hook reads.
#[derive(Clone, Copy, Debug)]
pub(super) struct HookedSession {
    pub pid: u32,
    /// `None` for a Unix socket.
    pub client: Option<std::net::SocketAddr>,
    /// The server's address the session reached (`None` for a Unix socket).
    pub server: Option<std::net::SocketAddr>,
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
/// sent again when the client's own copy of them is refused. Kept as the
/// ranges released (a lost release followed by bytes the kernel passed
/// itself and another release stays findable), at most [`MAX_DELIVERED`]
/// bytes: beyond that the oldest go, and a copy of them is only refused
/// (the session fails closed rather than the agent keeping without bound
/// what a server that stopped acknowledging never takes).
#[derive(Debug, Default, PartialEq)]
pub(super) struct Delivered {
    ranges: VecDeque<(u32, Vec<u8>)>,
    bytes: usize,
    /// The refused copy last answered, and when: the same copy again
    /// within `REDELIVER_EVERY` is not answered again.
    pub last: Option<(u32, Instant)>,
}

/// See [`Delivered`]: as much as the wire stage holds for one connection.
pub(super) const MAX_DELIVERED: usize = crate::wire::tcp::MAX_HELD_BYTES;

impl Delivered {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Bytes re-injected at `seq`: appended to the last range when they
    /// follow it, a new range otherwise.
    pub fn add(&mut self, seq: u32, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match self.ranges.back_mut() {
            Some((at, kept)) if at.wrapping_add(kept.len() as u32) == seq => {
                kept.extend_from_slice(bytes)
            }
            _ => self.ranges.push_back((seq, bytes.to_vec())),
        }
        self.bytes += bytes.len();
        while self.bytes > MAX_DELIVERED {
            let Some((at, front)) = self.ranges.front_mut() else {
                break;
            };
            let over = (self.bytes - MAX_DELIVERED).min(front.len());
            front.drain(..over);
            *at = at.wrapping_add(over as u32);
            self.bytes -= over;
            if front.is_empty() {
                self.ranges.pop_front();
            }
        }
    }

    /// The server acknowledged every byte before `ack`.
    pub fn acknowledged(&mut self, ack: u32) {
        while let Some((at, front)) = self.ranges.front_mut() {
            if !held::seq_lt(*at, ack) {
                return;
            }
            let end = at.wrapping_add(front.len() as u32);
            if !held::seq_lt(ack, end) {
                self.bytes -= front.len();
                self.ranges.pop_front();
                continue;
            }
            let n = ack.wrapping_sub(*at) as usize;
            front.drain(..n);
            *at = ack;
            self.bytes -= n;
            return;
        }
    }

    /// The kept bytes within `[seq, seq + len)`, range by range.
    pub fn overlapping(&self, seq: u32, len: usize) -> Vec<(u32, &[u8])> {
        let end = seq.wrapping_add(len as u32);
        self.ranges
            .iter()
            .filter_map(|(at, kept)| {
                let kept_end = at.wrapping_add(kept.len() as u32);
                let from = if held::seq_lt(*at, seq) { seq } else { *at };
                let to = if held::seq_lt(end, kept_end) {
                    end
                } else {
                    kept_end
                };
                held::seq_lt(from, to).then(|| {
                    let skip = from.wrapping_sub(*at) as usize;
                    (from, &kept[skip..skip + to.wrapping_sub(from) as usize])
                })
            })
            .collect()
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
        assert!(d.overlapping(0, 10).is_empty(), "nothing kept");
        d.add(100, b"abcd");
        d.add(104, b"ef");
        assert_eq!(
            d.overlapping(0, 1000),
            vec![(100, &b"abcdef"[..])],
            "contiguous: one range"
        );
        assert_eq!(d.overlapping(105, 1), vec![(105, &b"f"[..])]);
        assert_eq!(
            d.overlapping(90, 12),
            vec![(100, &b"ab"[..])],
            "only the overlap"
        );
        assert!(d.overlapping(90, 10).is_empty() && d.overlapping(106, 5).is_empty());
        // Bytes the kernel passed itself in between, then another release:
        // both releases stay findable.
        d.add(200, b"xy");
        assert_eq!(d.overlapping(100, 1), vec![(100, &b"a"[..])]);
        assert_eq!(
            d.overlapping(103, 98),
            vec![(103, &b"def"[..]), (200, &b"x"[..])]
        );
        d.acknowledged(99);
        assert_eq!(
            d.overlapping(0, 1000).len(),
            2,
            "an older acknowledgment changes nothing"
        );
        d.acknowledged(103);
        assert_eq!(
            d.overlapping(0, 1000),
            vec![(103, &b"def"[..]), (200, &b"xy"[..])]
        );
        d.acknowledged(201);
        assert_eq!(d.overlapping(0, 1000), vec![(201, &b"y"[..])]);
        d.acknowledged(500);
        assert!(d.is_empty(), "all acknowledged");
        // Across the sequence-number wrap.
        let mut d = Delivered::default();
        d.add(u32::MAX - 1, b"abcd");
        assert_eq!(d.overlapping(0, 1), vec![(0, &b"c"[..])]);
        d.acknowledged(1);
        assert_eq!(d.overlapping(u32::MAX - 5, 20), vec![(1, &b"d"[..])]);
    }

    #[test]
    fn delivered_bytes_are_bounded_and_the_oldest_go() {
        let mut d = Delivered::default();
        let chunk = vec![7u8; MAX_DELIVERED / 2];
        d.add(0, &chunk);
        d.add(chunk.len() as u32 + 10, &chunk);
        d.add(2 * chunk.len() as u32 + 10, b"tail");
        let kept: usize = d
            .overlapping(0, 3 * chunk.len())
            .iter()
            .map(|(_, b)| b.len())
            .sum();
        assert_eq!(kept, MAX_DELIVERED);
        assert!(
            d.overlapping(0, 4).is_empty(),
            "the oldest bytes went first"
        );
        assert_eq!(d.overlapping(2 * chunk.len() as u32 + 10, 4)[0].1, b"tail");
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
