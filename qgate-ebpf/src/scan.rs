//! Proving a statement text harmless without the agent: one plain `SELECT`
//! or `SHOW`. Shared by the tc gate (bytes from the skb) and the server hook
//! (bytes from the backend's receive buffer); both copy the text into this
//! module's per-CPU buffer and call [`harmless`].
use aya_ebpf::{helpers::generated::bpf_loop, macros::map, maps::PerCpuArray};

/// Longest statement text the programs read to prove it harmless.
pub const SCAN: usize = 512;
const SCAN_MASK: usize = SCAN - 1;

/// Per-CPU working memory: the text and the scanner's state. Kept in a map,
/// not on the stack: values read back from a map are unknown to the
/// verifier, so the `bpf_loop` callback is checked once.
#[repr(C)]
struct ScanScratch {
    buf: [u8; SCAN],
    scan: Scan,
}

#[map(name = "SCAN_SCRATCH")]
static SCAN_SCRATCH: PerCpuArray<ScanScratch> = PerCpuArray::with_max_entries(1, 0);

/// Lower-case ASCII letters packed big-endian, for keyword comparison.
const KW_SELECT: u64 = 0x73656c656374; // "select"
const KW_SHOW: u64 = 0x73686f77; // "show"
const W_INTO: u64 = 0x696e746f; // "into": SELECT INTO creates a table
const W_FOR: u64 = 0x666f72; // "for": FOR UPDATE/SHARE take row locks

/// Scanner states.
const LEADING: u8 = 0;
const LINE_COMMENT: u8 = 1;
const BLOCK_COMMENT: u8 = 2;
const KEYWORD: u8 = 3;
const BODY: u8 = 4;
/// After the statement's one `;`: only whitespace may follow.
const TRAILING: u8 = 5;

#[inline(always)]
fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// The scanner's state between characters. `bpf_loop` calls [`scan_step`]
/// once per character, so the verifier checks the step once instead of
/// walking 512 unrolled iterations.
#[repr(C)]
struct Scan {
    word: u64,
    n: u32,
    word_len: u32,
    state: u8,
    prev: u8,
    skip_name: u8,
    refused: u8,
}

impl Scan {
    fn ends_word_badly(&self) -> bool {
        (self.word_len == 4 && self.word == W_INTO) || (self.word_len == 3 && self.word == W_FOR)
    }

    /// Feeds one character; `false` ends the scan (refused or end of text).
    #[inline(always)]
    fn step(&mut self, c: u8) -> bool {
        if self.skip_name != 0 {
            if c == 0 {
                self.skip_name = 0;
            }
            return true;
        }
        if c == 0 {
            return false;
        }
        match self.state {
            LEADING => {
                if self.prev == b'-' || self.prev == b'/' {
                    // The second character of a comment opener, or a stray operator.
                    if self.prev == b'-' && c == b'-' {
                        self.state = LINE_COMMENT;
                    } else if self.prev == b'/' && c == b'*' {
                        self.state = BLOCK_COMMENT;
                    } else {
                        return self.refuse();
                    }
                    self.prev = 0;
                    return true;
                }
                if c.is_ascii_alphabetic() {
                    self.state = KEYWORD;
                    self.word = c.to_ascii_lowercase() as u64;
                    self.word_len = 1;
                } else if !(c.is_ascii_whitespace() || c == b'-' || c == b'/') {
                    return self.refuse();
                }
            }
            LINE_COMMENT => {
                // The lexer ends `--` comments at either newline character.
                if c == b'\n' || c == b'\r' {
                    self.state = LEADING;
                }
            }
            BLOCK_COMMENT => {
                if c == b'*' && self.prev == b'/' {
                    return self.refuse();
                }
                if c == b'/' && self.prev == b'*' {
                    self.state = LEADING;
                    // This '/' must not start another comment.
                    self.prev = 0;
                    return true;
                }
            }
            KEYWORD => {
                if is_ident(c) {
                    if !c.is_ascii_alphabetic() || self.word_len >= 6 {
                        return self.refuse();
                    }
                    self.word = (self.word << 8) | c.to_ascii_lowercase() as u64;
                    self.word_len += 1;
                } else {
                    if (self.word != KW_SELECT && self.word != KW_SHOW) || c == b';' || c == b'(' {
                        return self.refuse();
                    }
                    self.state = BODY;
                    self.word = 0;
                    self.word_len = 0;
                }
            }
            TRAILING => {
                if !c.is_ascii_whitespace() {
                    return self.refuse();
                }
            }
            _ => {
                if c == b'(' {
                    return self.refuse();
                }
                if c == b';' {
                    // A terminating semicolon: fine if nothing but blanks follows.
                    if self.ends_word_badly() {
                        return self.refuse();
                    }
                    self.state = TRAILING;
                    self.prev = c;
                    return true;
                }
                if is_ident(c) {
                    self.word = (self.word << 8) | c.to_ascii_lowercase() as u64;
                    self.word_len += 1;
                } else {
                    if self.ends_word_badly() {
                        return self.refuse();
                    }
                    self.word = 0;
                    self.word_len = 0;
                }
            }
        }
        self.prev = c;
        true
    }

    fn refuse(&mut self) -> bool {
        self.refused = 1;
        false
    }

    /// The verdict once the text ended.
    fn harmless(&self) -> bool {
        self.refused == 0
            && match self.state {
                KEYWORD => self.word == KW_SELECT || self.word == KW_SHOW,
                BODY => !self.ends_word_badly(),
                TRAILING => true,
                _ => false,
            }
    }
}

/// `bpf_loop` callback: one character of the scratch buffer.
extern "C" fn scan_step(index: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(scratch) = SCAN_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU slot, this program run is its only user.
    let (buf, scan) = unsafe { (&(*scratch).buf, &mut (*scratch).scan) };
    let i = index as usize & SCAN_MASK;
    if i >= scan.n as usize {
        return 1;
    }
    let c = buf[i];
    if scan.step(c) {
        0
    } else {
        1
    }
}

/// The buffer to copy a text of `len` bytes into, and the number of bytes
/// to copy (1..=SCAN, a bound the verifier can see); `None` when the text is
/// empty or longer than [`SCAN`] (never harmless by this module's proof).
#[inline(always)]
pub fn buffer(len: u32) -> Option<(*mut u8, u32)> {
    if len == 0 || len as usize > SCAN {
        return None;
    }
    let scratch = SCAN_SCRATCH.get_ptr_mut(0)?;
    let n = ((core::hint::black_box(len) - 1) & (SCAN as u32 - 1)) + 1;
    // SAFETY: per-CPU slot; only the address of its buffer is taken.
    Some((unsafe { (*scratch).buf.as_mut_ptr() }, n))
}

/// True only for the text of one `SELECT` or `SHOW` statement with no `;`
/// other than a final one followed by blanks only, no parenthesis (so no function call, subquery or VALUES list) and no
/// `INTO`/`FOR` word, after leading whitespace and comments. Nested block
/// comments are refused rather than followed.
#[inline(always)]
pub fn harmless(n: u32, is_parse: bool) -> bool {
    let Some(scratch) = SCAN_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, this program run is its only user.
    let scan = unsafe { &mut (*scratch).scan };
    *scan = Scan {
        word: 0,
        n,
        word_len: 0,
        state: LEADING,
        prev: 0,
        skip_name: is_parse as u8,
        refused: 0,
    };
    // SAFETY: callback and context are valid for the call's duration.
    let rc = unsafe {
        bpf_loop(
            n,
            scan_step as *mut core::ffi::c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    // SAFETY: per-CPU slot, written by the callback.
    rc >= 0 && unsafe { (*scratch).scan.harmless() }
}
