//! Putting a kernel record (a TCP segment, a hook read or write) back
//! together from the ring's chunks, for both capture points.
//!
//! A program writes a record longer than one ring entry as several chunks,
//! in order, each naming its offset. They do not arrive back to back: two
//! CPUs emitting at the same time interleave their entries in the one ring.
//! A chunk continues the record of the same program run whose bytes end
//! where it starts; a truncation marker, a chunk out of place, or a chunk
//! whose start was never seen ends its record as truncated (counted by the
//! stages after: never a silent gap).

/// A record being assembled.
pub trait Assembled {
    fn bytes_mut(&mut self) -> &mut Vec<u8>;
    fn set_truncated(&mut self);
}

/// What a chunk's header says about its place.
#[derive(Clone, Copy, Debug)]
pub struct Chunk {
    /// The program gave up on the record here (`TRUNCATED` flag).
    pub marker: bool,
    /// Where the chunk's bytes start in the record.
    pub offset: u32,
    /// The record's whole length.
    pub total: u32,
}

/// Records being assembled at once: one per CPU emitting at the same time
/// is the most the ring interleaves; past this the oldest is given up as
/// truncated.
pub const MAX_PARTIAL: usize = 64;

/// Records whose chunks are still arriving.
pub struct Assembler<R> {
    partial: Vec<R>,
}

impl<R> Default for Assembler<R> {
    fn default() -> Self {
        Assembler {
            partial: Vec::new(),
        }
    }
}

impl<R: Assembled> Assembler<R> {
    /// Takes one chunk. `continues`: whether a record being assembled is
    /// the one this chunk belongs to (same program run). `supersedes`:
    /// whether a new record ends one still incomplete (a backend is one
    /// thread: its next record means the last one will not go on). `start`
    /// makes the record from the chunk's header (`None`: ignore it).
    /// Every record that ends, whole or truncated, goes to `sink`.
    pub fn push(
        &mut self,
        chunk: Chunk,
        data: &[u8],
        continues: impl Fn(&R) -> bool,
        supersedes: impl Fn(&R) -> bool,
        start: impl FnOnce() -> Option<R>,
        sink: &mut impl FnMut(R),
    ) {
        let total = chunk.total as usize;
        if chunk.marker || chunk.offset != 0 {
            if let Some(i) = self.partial.iter().position(&continues) {
                let mut prev = self.partial.remove(i);
                if chunk.marker || prev.bytes_mut().len() != chunk.offset as usize {
                    prev.set_truncated();
                    sink(prev);
                    return;
                }
                prev.bytes_mut().extend_from_slice(data);
                if prev.bytes_mut().len() >= total {
                    sink(prev);
                } else {
                    self.partial.push(prev);
                }
                return;
            }
        }
        while let Some(i) = self.partial.iter().position(&supersedes) {
            let mut prev = self.partial.remove(i);
            prev.set_truncated();
            sink(prev);
        }
        let Some(mut record) = start() else {
            return;
        };
        if chunk.marker || chunk.offset != 0 {
            // Its start was never seen.
            record.set_truncated();
            sink(record);
            return;
        }
        record.bytes_mut().extend_from_slice(data);
        if record.bytes_mut().len() >= total {
            sink(record);
            return;
        }
        let have = record.bytes_mut().len();
        record.bytes_mut().reserve_exact(total - have);
        if self.partial.len() >= MAX_PARTIAL {
            let mut oldest = self.partial.remove(0);
            oldest.set_truncated();
            sink(oldest);
        }
        self.partial.push(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Rec {
        run: u32,
        bytes: Vec<u8>,
        truncated: bool,
    }

    impl Assembled for Rec {
        fn bytes_mut(&mut self) -> &mut Vec<u8> {
            &mut self.bytes
        }
        fn set_truncated(&mut self) {
            self.truncated = true;
        }
    }

    fn push(
        a: &mut Assembler<Rec>,
        run: u32,
        total: u32,
        offset: u32,
        data: &[u8],
        out: &mut Vec<Rec>,
    ) {
        a.push(
            Chunk {
                marker: false,
                offset,
                total,
            },
            data,
            |r| r.run == run,
            |_| false,
            || {
                Some(Rec {
                    run,
                    bytes: Vec::new(),
                    truncated: false,
                })
            },
            &mut |r| out.push(r),
        );
    }

    #[test]
    fn interleaved_chunks_make_whole_records_and_strays_end_truncated() {
        let (mut a, mut out) = (Assembler::default(), Vec::new());
        push(&mut a, 1, 8, 0, b"AAAA", &mut out);
        push(&mut a, 2, 6, 0, b"BBB", &mut out);
        push(&mut a, 1, 8, 4, b"aaaa", &mut out);
        push(&mut a, 2, 6, 3, b"bbb", &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(
            (&out[0].bytes[..], out[0].truncated),
            (&b"AAAAaaaa"[..], false)
        );
        assert_eq!(
            (&out[1].bytes[..], out[1].truncated),
            (&b"BBBbbb"[..], false)
        );
        // A chunk whose start was never seen; one out of place.
        out.clear();
        push(&mut a, 3, 8, 4, b"zzzz", &mut out);
        push(&mut a, 4, 9, 0, b"CCC", &mut out);
        push(&mut a, 4, 9, 5, b"ccc", &mut out);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|r| r.truncated));
        assert_eq!(out[1].bytes, b"CCC");
    }
}
