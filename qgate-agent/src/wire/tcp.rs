//! One direction of a TCP connection put back in order (RFC 9293 §3.4,
//! "Sequence Numbers"): retransmissions and overlaps dropped, out-of-order
//! segments held until the hole before them fills, holes that will not fill
//! reported as gaps.
//!
//! Positions are *stream offsets*: sequence-space distance from the first
//! byte of the stream (the byte after the SYN, or the first byte seen when
//! picked up mid-stream). A gap skips offsets rather than renumbering, so an
//! offset maps to a sequence number exactly ([`StreamReassembler::seq_at`]).
use std::collections::BTreeMap;

/// Out-of-order bytes held per direction before the hole is given up.
pub const MAX_HELD_BYTES: usize = 4 << 20;

/// What the reassembler hands on, in stream order.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery<'a> {
    /// In-order bytes starting at `offset`. Usually borrowed straight from
    /// the segment.
    Data { offset: u64, bytes: &'a [u8] },
    /// Bytes from `offset` on were lost (capture loss, truncation, a hole
    /// that never filled). The next `Data` says where the stream resumes.
    Gap { offset: u64 },
}

#[derive(Debug)]
struct Held {
    bytes: Vec<u8>,
    /// The capture lost bytes after these.
    truncated: bool,
}

#[derive(Debug, Default)]
pub struct StreamReassembler {
    /// Sequence number of stream offset 0; `None` until the first SYN or data.
    origin: Option<u32>,
    /// Offset of the next byte expected.
    next: u64,
    held: BTreeMap<u64, Held>,
    held_bytes: usize,
    /// After a gap whose end is unknown (truncation): the next segment at or
    /// beyond `next` starts the stream again.
    resume_anywhere: bool,
}

impl StreamReassembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether any SYN or data has been seen.
    pub fn is_started(&self) -> bool {
        self.origin.is_some()
    }

    /// Offset of the next byte expected.
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    /// Sequence number of the byte at `offset`.
    pub fn seq_at(&self, offset: u64) -> Option<u32> {
        // Sequence space wraps at 2^32: truncation is the point.
        self.origin.map(|o| o.wrapping_add(offset as u32))
    }

    /// Stream offset of sequence number `seq`, taken as the one nearest to
    /// the current position (within ±2^31, RFC 9293 §3.4). `None` before the
    /// stream start or if nothing was seen yet.
    pub fn offset_of(&self, seq: u32) -> Option<u64> {
        let expected = self.seq_at(self.next)?;
        let delta = i64::from(qgate_common::tcp::seq_delta(seq, expected));
        u64::try_from(self.next as i64 + delta).ok()
    }

    /// Feeds one segment. `seq` is the segment's sequence number (of the SYN
    /// itself for a SYN); `truncated`: the capture lost bytes after `payload`.
    pub fn push(
        &mut self,
        seq: u32,
        syn: bool,
        payload: &[u8],
        truncated: bool,
        sink: &mut impl FnMut(Delivery<'_>),
    ) {
        let data_seq = if syn { seq.wrapping_add(1) } else { seq };
        if self.origin.is_none() {
            if !(syn || !payload.is_empty() || truncated) {
                return;
            }
            self.origin = Some(data_seq);
        }
        if payload.is_empty() && !truncated {
            return;
        }
        let Some(start) = self.offset_of(data_seq) else {
            return;
        };
        if self.resume_anywhere && start >= self.next {
            self.resume_anywhere = false;
            self.next = start;
        }
        if start > self.next {
            self.hold(start, payload, truncated, sink);
            return;
        }
        self.accept(start, payload, truncated, sink);
        self.drain(sink);
    }

    /// Delivers the new part of bytes that start at or before `next`.
    fn accept(
        &mut self,
        start: u64,
        bytes: &[u8],
        truncated: bool,
        sink: &mut impl FnMut(Delivery<'_>),
    ) {
        let end = start + bytes.len() as u64;
        if end > self.next {
            let skip = (self.next - start) as usize;
            sink(Delivery::Data {
                offset: self.next,
                bytes: &bytes[skip..],
            });
            self.next = end;
            if truncated {
                self.lose_after_next(sink);
            }
        } else if truncated && start == self.next {
            self.lose_after_next(sink);
        }
    }

    /// Gives up on every hole: reports it and delivers what was held. For
    /// the end of a connection (RST, both FINs, idle) or of the capture.
    pub fn flush(&mut self, sink: &mut impl FnMut(Delivery<'_>)) {
        while let Some(&first) = self.held.keys().next() {
            if first > self.next {
                sink(Delivery::Gap { offset: self.next });
                self.next = first;
            }
            self.drain(sink);
        }
    }

    fn hold(
        &mut self,
        start: u64,
        payload: &[u8],
        truncated: bool,
        sink: &mut impl FnMut(Delivery<'_>),
    ) {
        let replace = self
            .held
            .get(&start)
            .is_none_or(|h| h.bytes.len() < payload.len());
        if replace {
            let old = self.held.insert(
                start,
                Held {
                    bytes: payload.to_vec(),
                    truncated,
                },
            );
            self.held_bytes += payload.len();
            self.held_bytes -= old.map_or(0, |h| h.bytes.len());
        }
        if self.held_bytes > MAX_HELD_BYTES {
            if let Some(&first) = self.held.keys().next() {
                sink(Delivery::Gap { offset: self.next });
                self.next = first;
                self.drain(sink);
            }
        }
    }

    /// Delivers held segments that the stream has reached.
    fn drain(&mut self, sink: &mut impl FnMut(Delivery<'_>)) {
        while let Some(entry) = self.held.first_entry() {
            let start = *entry.key();
            if start > self.next {
                break;
            }
            let held = entry.remove();
            self.held_bytes -= held.bytes.len();
            self.accept(start, &held.bytes, held.truncated, sink);
        }
    }

    /// The bytes after `next` are lost and their extent is unknown: report a
    /// gap and resume at the next held segment, or the next one to arrive.
    fn lose_after_next(&mut self, sink: &mut impl FnMut(Delivery<'_>)) {
        sink(Delivery::Gap { offset: self.next });
        match self.held.keys().next() {
            Some(&first) if first > self.next => self.next = first,
            Some(_) => {}
            None => self.resume_anywhere = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds segments (seq, syn, payload, truncated); returns the deliveries
    /// as `Data(offset, bytes)` / `Gap(offset)` strings.
    fn run(r: &mut StreamReassembler, segments: &[(u32, bool, &[u8], bool)]) -> Vec<String> {
        let mut seen = Vec::new();
        for &(seq, syn, payload, truncated) in segments {
            r.push(seq, syn, payload, truncated, &mut |d| {
                seen.push(match d {
                    Delivery::Data { offset, bytes } => {
                        format!("Data({offset}, {})", String::from_utf8_lossy(bytes))
                    }
                    Delivery::Gap { offset } => format!("Gap({offset})"),
                })
            });
        }
        seen
    }

    #[test]
    fn in_order_segments_are_delivered_after_the_syn() {
        let mut r = StreamReassembler::new();
        let seen = run(
            &mut r,
            &[
                (99, true, b"", false),
                (100, false, b"abc", false),
                (103, false, b"de", false),
            ],
        );
        assert_eq!(seen, ["Data(0, abc)", "Data(3, de)"]);
        assert_eq!(r.seq_at(0), Some(100));
        assert_eq!(r.offset_of(103), Some(3));
    }

    #[test]
    fn exact_retransmissions_are_dropped() {
        let mut r = StreamReassembler::new();
        let seen = run(
            &mut r,
            &[
                (1, true, b"", false),
                (2, false, b"abc", false),
                (2, false, b"abc", false),
            ],
        );
        assert_eq!(seen, ["Data(0, abc)"]);
    }

    #[test]
    fn partially_overlapping_retransmissions_deliver_only_new_bytes() {
        let mut r = StreamReassembler::new();
        let seen = run(
            &mut r,
            &[
                (1, true, b"", false),
                (2, false, b"abcd", false),
                (4, false, b"cdefg", false),
            ],
        );
        assert_eq!(seen, ["Data(0, abcd)", "Data(4, efg)"]);
    }

    #[test]
    fn out_of_order_segments_wait_for_the_hole_to_fill() {
        let mut r = StreamReassembler::new();
        let seen = run(
            &mut r,
            &[
                (1, true, b"", false),
                (10, false, b"ij", false),
                (6, false, b"efg", false),
                (6, false, b"efgh", false),
                (2, false, b"abcd", false),
            ],
        );
        assert_eq!(seen, ["Data(0, abcd)", "Data(4, efgh)", "Data(8, ij)"]);
    }

    #[test]
    fn sequence_numbers_wrap_around() {
        let mut r = StreamReassembler::new();
        let seen = run(
            &mut r,
            &[
                (u32::MAX - 1, true, b"", false),
                (u32::MAX, false, b"ab", false),
                (2, false, b"ef", false),
                (1, false, b"cd", false),
            ],
        );
        assert_eq!(seen, ["Data(0, ab)", "Data(2, cd)", "Data(4, f)"]);
        assert_eq!(r.seq_at(0), Some(u32::MAX));
        assert_eq!(r.seq_at(2), Some(1));
        assert_eq!(r.offset_of(3), Some(4));
    }

    #[test]
    fn a_mid_stream_pickup_starts_at_the_first_data_segment() {
        let mut r = StreamReassembler::new();
        let seen = run(
            &mut r,
            &[(5000, false, b"xyz", false), (4990, false, b"old", false)],
        );
        assert_eq!(seen, ["Data(0, xyz)"]);
        assert_eq!(r.seq_at(3), Some(5003));
    }

    #[test]
    fn a_truncated_segment_is_a_gap_and_the_stream_resumes_at_the_next_segment() {
        let mut r = StreamReassembler::new();
        let seen = run(
            &mut r,
            &[
                (1, true, b"", false),
                (2, false, b"abc", true),
                (2000, false, b"next", false),
                (2004, false, b"more", false),
            ],
        );
        assert_eq!(
            seen,
            [
                "Data(0, abc)",
                "Gap(3)",
                "Data(1998, next)",
                "Data(2002, more)"
            ]
        );
    }

    #[test]
    fn a_hole_is_given_up_when_too_much_is_held() {
        let mut r = StreamReassembler::new();
        let chunk = vec![b'x'; 1 << 20];
        let mut seen = run(&mut r, &[(1, true, b"", false)]);
        let mut seq = 2 + 100;
        for _ in 0..5 {
            seen.extend(run(&mut r, &[(seq, false, &chunk, false)]));
            seq += chunk.len() as u32;
        }
        assert_eq!(seen.first().map(String::as_str), Some("Gap(0)"));
        assert_eq!(seen.iter().filter(|s| s.starts_with("Data")).count(), 5);
        assert_eq!(r.next_offset(), 100 + 5 * (1 << 20));
    }

    #[test]
    fn flushing_reports_the_hole_and_delivers_what_was_held() {
        let mut r = StreamReassembler::new();
        let mut seen = run(
            &mut r,
            &[(1, true, b"", false), (10, false, b"late", false)],
        );
        r.flush(&mut |d| seen.push(format!("{d:?}")));
        assert_eq!(
            seen,
            [
                "Gap { offset: 0 }",
                "Data { offset: 8, bytes: [108, 97, 116, 101] }"
            ]
        );
    }
}
