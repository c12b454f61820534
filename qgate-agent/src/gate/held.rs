//! The bytes of one connection that the tc program is holding, and what is
//! decided about them.
//!
//! The program drops every client→server byte from `base` on; each dropped
//! copy is captured and kept here. Of two copies of the same bytes the first
//! one wins unless the later one is longer, exactly as the wire stage's
//! reassembly (`wire::tcp`) chooses: what is decided is what is re-injected.
//! (The newest copy's TCP header is kept for re-injection: it has the
//! freshest timestamp.) The wire stage reports message
//! boundaries; SQL messages wait in order for a decision. Bytes up to the first
//! undecided SQL message (and never into a message not yet seen whole) can be
//! released, with denied statements rewritten in place.
use std::collections::{BTreeMap, VecDeque};

pub use qgate_common::tcp::seq_lt;

/// At most this many held bytes per connection (contiguous and beyond
/// holes). A client's window bounds what it can have unacknowledged; raw
/// segments at arbitrary sequence numbers do not, and would otherwise grow
/// the agent without bound. Past it the connection is reset.
pub const MAX_HELD: usize = 16 << 20;

/// A SQL-bearing message inside the held stream.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingSql<T> {
    /// First byte of the message (its type byte).
    pub start: u32,
    /// One past its last byte.
    pub end: u32,
    /// Where its SQL text is, for a same-length rewrite: `[text_start, text_end)`.
    pub text_start: u32,
    pub text_end: u32,
    /// Whatever the caller needs to decide it (text, statement name, …).
    pub info: T,
    /// Set once a request waits for reviewers.
    pub request: Option<i64>,
    /// Only a prefix of the message was ever held: the client stopped
    /// sending (its congestion window is full of bytes the server never
    /// acknowledged) before the message was whole. `text_end` is then where
    /// the held bytes end, and `end` where the message will.
    pub incomplete: bool,
    /// Only the end of the message is held: its first bytes reached the
    /// server already (the kernel holds a message longer than its segment
    /// by its end). `start` is where the held bytes begin and
    /// `[text_start, text_end)` the held part of its text (possibly empty);
    /// the decision is on the whole text all the same.
    pub tail: bool,
}

pub struct HeldStream<T> {
    /// First byte not released yet (the program's `hold_seq`).
    base: u32,
    /// Contiguous held bytes from `base`.
    data: Vec<u8>,
    /// Held bytes beyond a hole, by sequence number.
    pieces: BTreeMap<u32, Vec<u8>>,
    /// Bytes in `pieces`.
    piece_bytes: usize,
    /// Newest held copy's TCP header.
    template: Vec<u8>,
    /// End of the last complete message the wire stage reported.
    boundary: u32,
    /// Undecided SQL messages, in stream order.
    pending: VecDeque<PendingSql<T>>,
    /// Replacements to apply at release: (seq, bytes).
    rewrites: Vec<(u32, Vec<u8>)>,
    /// End of the last SQL message decided here: a message that ends there
    /// was decided already, whatever part of it is still held.
    decided_end: Option<u32>,
}

/// Bytes ready to be re-injected.
#[derive(Debug, PartialEq)]
pub struct Release {
    pub seq: u32,
    pub bytes: Vec<u8>,
    pub template: Vec<u8>,
    /// Held bytes or undecided messages remain after this release.
    pub more_held: bool,
    /// Where the next message header is: past the released bytes when a
    /// decided message is still to come in whole (see `PendingSql::incomplete`).
    pub next_header: u32,
}

impl<T> HeldStream<T> {
    pub fn new(base: u32) -> Self {
        Self {
            base,
            data: Vec::new(),
            pieces: BTreeMap::new(),
            piece_bytes: 0,
            template: Vec::new(),
            boundary: base,
            pending: VecDeque::new(),
            rewrites: Vec::new(),
            decided_end: None,
        }
    }

    /// Newest held copy's TCP header (its acknowledgment number is the
    /// server's next sequence number).
    pub fn template(&self) -> &[u8] {
        &self.template
    }

    /// True when the SQL message ending at `end` was decided here already.
    pub fn decided(&self, end: u32) -> bool {
        self.decided_end == Some(end)
    }

    pub fn base(&self) -> u32 {
        self.base
    }

    /// End of the last complete message reported.
    pub fn boundary(&self) -> u32 {
        self.boundary
    }

    /// Up to `n` held bytes from `seq` (which must be within the contiguous data).
    pub fn peek(&self, seq: u32, n: usize) -> &[u8] {
        let at = seq.wrapping_sub(self.base) as usize;
        let end = at.saturating_add(n).min(self.data.len());
        self.data.get(at..end).unwrap_or(&[])
    }

    /// End of the contiguous held bytes.
    pub fn data_end(&self) -> u32 {
        self.base.wrapping_add(self.data.len() as u32)
    }

    /// Keeps a dropped copy. Bytes before `base` were released already.
    pub fn add_copy(&mut self, seq: u32, payload: &[u8], tcp_header: &[u8]) {
        if !tcp_header.is_empty() {
            self.template = tcp_header.to_vec();
        }
        let end = seq.wrapping_add(payload.len() as u32);
        if !seq_lt(self.base, end) {
            return;
        }
        let (seq, payload) = if seq_lt(seq, self.base) {
            let skip = self.base.wrapping_sub(seq) as usize;
            (self.base, &payload[skip..])
        } else {
            (seq, payload)
        };
        // As `wire::tcp` keeps an out-of-order segment: the first copy
        // unless a later one at the same place is longer.
        let replace = self
            .pieces
            .get(&seq)
            .is_none_or(|kept| kept.len() < payload.len());
        if replace {
            self.piece_bytes += payload.len();
            if let Some(old) = self.pieces.insert(seq, payload.to_vec()) {
                self.piece_bytes -= old.len();
            }
        }
        self.absorb_pieces();
    }

    /// Bytes kept: contiguous and beyond holes. The gate refuses to keep
    /// more than [`MAX_HELD`].
    pub fn held_bytes(&self) -> usize {
        self.data.len() + self.piece_bytes
    }

    /// Moves pieces that now touch the contiguous data into it, in stream
    /// order: the one nearest the base first, counted from the base (the
    /// map's numeric order is not stream order once sequence numbers wrap,
    /// and absorbing a later piece first would keep other bytes than the
    /// wire stage's reassembly, which judges them).
    fn absorb_pieces(&mut self) {
        loop {
            let end = self.data_end();
            let base = self.base;
            let Some(seq) = self
                .pieces
                .keys()
                .copied()
                .filter(|&s| !seq_lt(end, s))
                .min_by_key(|&s| s.wrapping_sub(base))
            else {
                return;
            };
            let piece = self.pieces.remove(&seq).unwrap_or_default();
            self.piece_bytes -= piece.len();
            let skip = end.wrapping_sub(seq) as usize;
            if skip < piece.len() {
                self.data.extend_from_slice(&piece[skip..]);
            }
        }
    }

    /// A complete client message ends at `end`.
    pub fn message_ends(&mut self, end: u32) {
        if seq_lt(self.boundary, end) {
            self.boundary = end;
        }
    }

    /// A SQL message that needs a decision (it also ends a message).
    pub fn push_sql(&mut self, sql: PendingSql<T>) {
        self.message_ends(sql.end);
        self.pending.push_back(sql);
    }

    /// Whether a SQL message waits for a decision.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The first undecided SQL message.
    pub fn front(&mut self) -> Option<&mut PendingSql<T>> {
        self.pending.front_mut()
    }

    /// The first pending message is allowed as sent.
    pub fn allow_front(&mut self) -> Option<PendingSql<T>> {
        let sql = self.pending.pop_front()?;
        self.decided_end = Some(sql.end);
        Some(sql)
    }

    /// The first pending message is denied: its text becomes `replacement`
    /// (exactly `text_end - text_start` bytes).
    pub fn deny_front(&mut self, replacement: Vec<u8>) -> Option<PendingSql<T>> {
        let sql = self.pending.pop_front()?;
        self.decided_end = Some(sql.end);
        debug_assert_eq!(
            replacement.len() as u32,
            sql.text_end.wrapping_sub(sql.text_start)
        );
        self.rewrites.push((sql.text_start, replacement));
        Some(sql)
    }

    /// Pending messages with a request, for withdrawal.
    pub fn pending(&self) -> impl Iterator<Item = &PendingSql<T>> {
        self.pending.iter()
    }

    /// Takes what can go to the server now: from `base` up to the first
    /// undecided message, never past the last complete message, never past
    /// the bytes actually held.
    pub fn take_release(&mut self) -> Option<Release> {
        let mut end = self.boundary;
        if let Some(front) = self.pending.front() {
            if seq_lt(front.start, end) {
                end = front.start;
            }
        }
        if seq_lt(self.data_end(), end) {
            end = self.data_end();
        }
        if !seq_lt(self.base, end) {
            return None;
        }
        let n = end.wrapping_sub(self.base) as usize;
        let mut bytes: Vec<u8> = self.data.drain(..n).collect();
        let seq = self.base;
        self.rewrites.retain(|(at, replacement)| {
            let offset = at.wrapping_sub(seq) as usize;
            if offset + replacement.len() <= bytes.len() {
                bytes[offset..offset + replacement.len()].copy_from_slice(replacement);
                false
            } else {
                true
            }
        });
        self.base = end;
        let more_held =
            !self.data.is_empty() || !self.pieces.is_empty() || !self.pending.is_empty();
        let next_header = if !more_held && seq_lt(end, self.boundary) {
            self.boundary
        } else {
            end
        };
        Some(Release {
            seq,
            bytes,
            template: self.template.clone(),
            more_held,
            next_header,
        })
    }

    /// Nothing held and nothing waiting.
    pub fn is_idle(&self) -> bool {
        self.data.is_empty() && self.pieces.is_empty() && self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql(start: u32, end: u32) -> PendingSql<&'static str> {
        PendingSql {
            start,
            end,
            text_start: start.wrapping_add(5),
            text_end: end.wrapping_sub(1),
            info: "q",
            request: None,
            incomplete: false,
            tail: false,
        }
    }

    #[test]
    fn a_second_copy_of_held_bytes_never_replaces_the_first() {
        // Held beyond a hole, then sent again with other bytes of the same
        // length: the wire stage decodes the first copy, so that is what
        // goes to the server once the hole fills.
        let mut h: HeldStream<&str> = HeldStream::new(100);
        h.add_copy(105, b"SELECT 1;", b"");
        h.add_copy(105, b"DROP t;--", b"");
        h.add_copy(100, b"Q\0\0\0\x0e", b"");
        assert_eq!(h.peek(100, 14), b"Q\0\0\0\x0eSELECT 1;");
        // In order, too: bytes already held stay.
        h.add_copy(105, b"DROP t;--", b"");
        assert_eq!(h.peek(105, 9), b"SELECT 1;");
        // A longer copy extends (and, beyond a hole, replaces: as `wire::tcp`).
        let mut h: HeldStream<&str> = HeldStream::new(0);
        h.add_copy(10, b"abc", b"");
        h.add_copy(10, b"xyzw", b"");
        h.add_copy(0, b"0123456789", b"");
        assert_eq!(h.peek(0, 14), b"0123456789xyzw");
    }

    #[test]
    fn pieces_beyond_a_hole_are_absorbed_in_stream_order_across_the_wrap() {
        // Two pieces both touch the data once the hole fills: the one
        // nearer the base goes first (as `wire::tcp`, which counts offsets
        // from the stream's start), even when the other's sequence number
        // wrapped to a smaller one.
        let base = 0xFFFF_FFF0u32;
        let mut h: HeldStream<&str> = HeldStream::new(base);
        h.add_copy(base.wrapping_add(10), &[b'A'; 20], b"");
        h.add_copy(base.wrapping_add(17), &[b'B'; 13], b"");
        h.add_copy(base, &[b'0'; 20], b"");
        assert_eq!(h.data_end(), base.wrapping_add(30));
        assert_eq!(h.peek(base.wrapping_add(20), 10), &[b'A'; 10]);
    }

    #[test]
    fn held_bytes_count_data_and_pieces_once() {
        let mut h: HeldStream<&str> = HeldStream::new(0);
        h.add_copy(10, b"abcde", b"");
        h.add_copy(10, b"abc", b"");
        assert_eq!(h.held_bytes(), 5, "a shorter copy is not kept");
        h.add_copy(10, b"abcdefg", b"");
        assert_eq!(h.held_bytes(), 7, "a longer one replaces it");
        h.add_copy(0, b"0123456789", b"");
        assert_eq!(h.held_bytes(), 17, "absorbed: counted once");
        h.add_copy(5, b"56789abc", b"");
        assert_eq!(h.held_bytes(), 17, "bytes already held add nothing");
    }

    #[test]
    fn nothing_is_released_before_its_message_is_decided() {
        let mut h = HeldStream::new(100);
        h.add_copy(100, b"Q\0\0\0\x0bDROP t\0", b"hdr");
        h.push_sql(sql(100, 112));
        assert_eq!(h.take_release(), None);
        h.allow_front();
        let r = h.take_release().expect("released");
        assert_eq!((r.seq, r.bytes.len(), r.more_held), (100, 12, false));
        assert_eq!(r.template, b"hdr");
        assert!(h.is_idle());
    }

    #[test]
    fn denied_text_is_rewritten_in_place_at_release() {
        let mut h = HeldStream::new(0);
        h.add_copy(0, b"Q\0\0\0\x0bDROP t\0", b"");
        h.push_sql(sql(0, 12));
        h.deny_front(b"qgate_".to_vec());
        assert_eq!(
            h.take_release().expect("released").bytes,
            b"Q\0\0\0\x0bqgate_\0"
        );
    }

    #[test]
    fn pipelined_messages_behind_a_held_one_wait_and_then_follow_in_order() {
        let mut h = HeldStream::new(0);
        h.add_copy(0, &[b'x'; 30], b"");
        h.message_ends(5); // e.g. a Bind before the SQL message
        h.push_sql(sql(5, 17));
        h.push_sql(sql(17, 30));
        let first = h.take_release().expect("bytes before the held message");
        assert_eq!(
            (first.seq, first.bytes.len(), first.more_held),
            (0, 5, true)
        );
        h.allow_front();
        let second = h.take_release().expect("up to the next undecided");
        assert_eq!((second.seq, second.bytes.len()), (5, 12));
        h.allow_front();
        let third = h.take_release().expect("the rest");
        assert_eq!(
            (third.seq, third.bytes.len(), third.more_held),
            (17, 13, false)
        );
    }

    #[test]
    fn a_partial_message_is_never_released() {
        let mut h: HeldStream<&str> = HeldStream::new(0);
        h.add_copy(0, &[b'x'; 10], b"");
        h.message_ends(4);
        let r = h.take_release().expect("the complete message");
        assert_eq!((r.bytes.len(), r.more_held), (4, true));
        assert_eq!(h.take_release(), None);
    }

    #[test]
    fn retransmitted_and_out_of_order_copies_fill_the_stream() {
        let mut h: HeldStream<&str> = HeldStream::new(1000);
        h.add_copy(1010, b"klmno", b"new");
        h.add_copy(1000, b"abcde", b"");
        h.add_copy(1003, b"defghij", b"");
        h.add_copy(990, b"0123456789abc", b"");
        h.message_ends(1015);
        let r = h.take_release().expect("contiguous");
        assert_eq!(r.bytes, b"abcdefghijklmno");
        assert_eq!(r.template, b"new");
    }

    #[test]
    fn an_approved_incomplete_message_releases_its_prefix_and_lets_the_rest_pass() {
        let mut h = HeldStream::new(0);
        h.add_copy(0, &[b'x'; 100], b"");
        let mut m = sql(0, 1000);
        m.text_end = 100;
        m.incomplete = true;
        h.push_sql(m);
        h.allow_front();
        let r = h.take_release().expect("the prefix");
        assert_eq!(
            (r.bytes.len(), r.more_held, r.next_header),
            (100, false, 1000)
        );
    }

    #[test]
    fn sequence_numbers_wrap() {
        let base = u32::MAX - 3;
        let mut h = HeldStream::new(base);
        h.add_copy(base, b"Q\0\0\0\x0bDROP t\0", b"");
        h.push_sql(sql(base, base.wrapping_add(12)));
        h.allow_front();
        let r = h.take_release().expect("released across the wrap");
        assert_eq!(r.bytes.len(), 12);
        assert_eq!(h.base(), base.wrapping_add(12));
    }
}
