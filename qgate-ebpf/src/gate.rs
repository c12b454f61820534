//! Deciding, per client→server segment, whether it may reach the server now
//! or must wait for the agent.
//!
//! The program follows PostgreSQL message boundaries (protocol 3.0, "Message
//! Formats": a type byte, then an Int32 length that counts itself) so it knows
//! which bytes are SQL. For `GATE_RISKY` a segment passes without a round trip
//! only when its one SQL-bearing message is a complete `Query` or `Parse`
//! whose text provably is a single plain read; anything it cannot prove within
//! its bounds is held. It may hold too much, never too little: the agent makes
//! the real decision for everything held.
use aya_ebpf::{
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_loop, bpf_skb_load_bytes},
    },
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use qgate_common::{mode, phase, tcp_flags, Counters, FlowKey, FlowState, GateConfig};

use crate::packet::{Segment, SkbRef};

#[map(name = "FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "GATE_CONFIG")]
static GATE_CONFIG: Array<GateConfig> = Array::with_max_entries(1, 0);

/// Longest statement text the program reads to prove it harmless.
const SCAN: usize = 512;
const SCAN_MASK: usize = SCAN - 1;

/// Per-CPU working memory. The walk and scan states live here rather than
/// on the stack on purpose: values read back from a map are unknown to the
/// verifier, so the `bpf_loop` callbacks converge after a few iterations
/// instead of being explored once per possible constant.
#[repr(C)]
struct Scratch {
    buf: [u8; SCAN],
    scan: Scan,
    walk: Walk,
}

#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Messages per segment the program walks; a segment with more is held.
const MAX_MESSAGES: usize = 24;

/// Protocol 3.0 request codes in a startup packet ("Message Formats").
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
/// First byte of a TLS record of type handshake (RFC 8446 §5.1).
const TLS_HANDSHAKE: u8 = 0x16;

pub enum Verdict {
    /// Let it through.
    Pass,
    /// Drop it and tell the agent: it waits for a decision.
    Hold,
    /// Drop it silently: an original of a statement that was denied.
    Drop,
}

/// `a` before `b` in sequence space (RFC 9293 §3.4, modulo 2^32).
#[inline(always)]
fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

#[inline(always)]
fn config() -> GateConfig {
    GATE_CONFIG.get(0).copied().unwrap_or_default()
}

#[inline(always)]
fn hold(state: &mut FlowState, seq: u32) -> Verdict {
    state.held = 1;
    state.hold_seq = seq;
    Verdict::Hold
}

pub fn verdict(ctx: &TcContext, seg: &Segment, flow: &FlowKey, counters: *mut Counters) -> Verdict {
    let cfg = config();
    let v = decide(ctx, seg, flow, &cfg);
    if !matches!(v, Verdict::Hold) || cfg.fail_open == 0 {
        return v;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(cfg.heartbeat_ns) <= cfg.fail_after_ns {
        return v;
    }
    // The agent is gone and the operator chose to fail open: pass, count,
    // and forget the boundaries so the agent re-syncs this connection when
    // it is back.
    if let Some(state) = FLOWS.get_ptr_mut(flow) {
        // SAFETY: map value; plain integers.
        let state = unsafe { &mut *state };
        state.held = 0;
        state.phase = phase::UNSYNCED;
    }
    if !counters.is_null() {
        // SAFETY: per-CPU slot.
        unsafe { (*counters).failed_open += 1 };
    }
    Verdict::Pass
}

#[inline(always)]
fn decide(ctx: &TcContext, seg: &Segment, flow: &FlowKey, cfg: &GateConfig) -> Verdict {
    if seg.tcp_flags & tcp_flags::SYN != 0 {
        let state = FlowState {
            next_msg_seq: seg.seq.wrapping_add(1),
            mode: cfg.default_mode,
            phase: phase::STARTUP,
            ..FlowState::default()
        };
        let _ = FLOWS.insert(flow, &state, 0);
        return Verdict::Pass;
    }
    if seg.payload_len == 0 {
        return Verdict::Pass;
    }
    let end = seg.seq.wrapping_add(seg.payload_len);
    let Some(state) = FLOWS.get_ptr_mut(flow) else {
        if cfg.default_mode == mode::MONITOR {
            return Verdict::Pass;
        }
        // Started before the program: nothing is known about its boundaries.
        let state = FlowState {
            hold_seq: seg.seq,
            mode: cfg.default_mode,
            phase: phase::UNSYNCED,
            held: 1,
            ..FlowState::default()
        };
        let _ = FLOWS.insert(flow, &state, 0);
        return Verdict::Hold;
    };
    // SAFETY: map value owned by the map; concurrent writers only race on
    // plain integers, and the agent re-checks everything it is told.
    let state = unsafe { &mut *state };
    if state.deny_start != state.deny_end
        && seq_lt(seg.seq, state.deny_end)
        && seq_lt(state.deny_start, end)
    {
        return Verdict::Drop;
    }
    if state.held != 0 {
        return if seq_lt(state.hold_seq, end) {
            Verdict::Hold
        } else {
            Verdict::Pass
        };
    }
    if state.mode == mode::MONITOR || state.phase == phase::OPAQUE {
        return Verdict::Pass;
    }
    if state.mode == mode::DENY {
        return hold(state, seg.seq);
    }
    if state.phase == phase::UNSYNCED {
        return hold(state, seg.seq);
    }
    // Where in this segment the next message header is.
    if seq_lt(seg.seq, state.next_msg_seq) && !seq_lt(state.next_msg_seq, end) {
        // Entirely before the next header: a retransmission of inspected bytes.
        return Verdict::Pass;
    }
    if seq_lt(state.next_msg_seq, seg.seq) {
        // A gap: bytes the program never inspected went missing or out of order.
        return hold(state, seg.seq);
    }
    let first = state.next_msg_seq.wrapping_sub(seg.seq);
    match state.phase {
        phase::STARTUP => startup(ctx, seg, state, cfg, first),
        phase::READY => messages(ctx, seg, state, first),
        _ => hold(state, seg.seq),
    }
}

/// The first packet of a connection: StartupMessage, SSLRequest,
/// GSSENCRequest, CancelRequest, or (after the server said `S`) TLS.
#[inline(always)]
fn startup(
    ctx: &TcContext,
    seg: &Segment,
    state: &mut FlowState,
    cfg: &GateConfig,
    off: u32,
) -> Verdict {
    let at = (seg.payload_offset + off) as usize;
    let Ok(first_byte) = ctx.load::<u8>(at) else {
        return hold(state, seg.seq);
    };
    if first_byte == TLS_HANDSHAKE {
        state.phase = phase::OPAQUE;
        return Verdict::Pass;
    }
    if off + 8 > seg.payload_len {
        return hold(state, seg.seq);
    }
    let (Ok(len), Ok(code)) = (ctx.load::<u32>(at), ctx.load::<u32>(at + 4)) else {
        return hold(state, seg.seq);
    };
    let (len, code) = (u32::from_be(len), u32::from_be(code));
    if code == SSL_REQUEST || code == GSSENC_REQUEST {
        state.next_msg_seq = state.next_msg_seq.wrapping_add(8);
        return Verdict::Pass;
    }
    if cfg.hold_startup != 0 || len < 8 || len > 10_000 {
        return hold(state, seg.seq);
    }
    state.next_msg_seq = state.next_msg_seq.wrapping_add(len);
    state.phase = phase::READY;
    Verdict::Pass
}

/// The message walk's state between headers, for [`walk_step`].
#[repr(C)]
struct Walk {
    payload_offset: u32,
    payload_len: u32,
    off: u32,
    sql_at: u32,
    sql_len: u32,
    sql_count: u32,
    sql_is_parse: u8,
    risky_only: u8,
    /// 1: hold the segment; 2: walked to the end.
    outcome: u8,
}

const WALK_HOLD: u8 = 1;
const WALK_DONE: u8 = 2;

/// `bpf_loop` callback: one message header.
extern "C" fn walk_step(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `SkbRef` on messages()'s stack, alive during bpf_loop.
    let skb = unsafe { (*(ctx as *mut SkbRef)).skb };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU slot, this program run is its only user.
    let w = unsafe { &mut (*scratch).walk };
    if w.off >= w.payload_len {
        w.outcome = WALK_DONE;
        return 1;
    }
    if w.off + 5 > w.payload_len {
        // The header itself is split across segments.
        w.outcome = WALK_HOLD;
        return 1;
    }
    let mut header = [0u8; 5];
    // SAFETY: 5 bytes into a 5-byte stack buffer; the helper checks the skb side.
    let rc = unsafe {
        bpf_skb_load_bytes(
            skb as *const _,
            w.payload_offset + w.off,
            header.as_mut_ptr() as *mut _,
            5,
        )
    };
    if rc != 0 {
        w.outcome = WALK_HOLD;
        return 1;
    }
    let ty = header[0];
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if !(4..=(1 << 30)).contains(&len) {
        w.outcome = WALK_HOLD;
        return 1;
    }
    match ty {
        // Query, Parse: carry SQL text.
        b'Q' | b'P' => {
            if w.risky_only == 0 || w.off + 1 + len > w.payload_len {
                w.outcome = WALK_HOLD;
                return 1;
            }
            w.sql_count += 1;
            w.sql_at = w.payload_offset + w.off + 5;
            w.sql_len = len - 4;
            w.sql_is_parse = (ty == b'P') as u8;
        }
        // FunctionCall runs any function by OID.
        b'F' => {
            w.outcome = WALK_HOLD;
            return 1;
        }
        _ => {}
    }
    w.off += 1 + len;
    0
}

/// Walks the message headers of a segment from `first`; holds it unless
/// every SQL-bearing message in it is provably harmless.
#[inline(always)]
fn messages(ctx: &TcContext, seg: &Segment, state: &mut FlowState, first: u32) -> Verdict {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return hold(state, seg.seq);
    };
    // SAFETY: per-CPU slot, this program run is its only user.
    let walk = unsafe { &mut (*scratch).walk };
    *walk = Walk {
        payload_offset: seg.payload_offset,
        payload_len: seg.payload_len,
        off: first,
        sql_at: 0,
        sql_len: 0,
        sql_count: 0,
        sql_is_parse: 0,
        risky_only: (state.mode == mode::GATE_RISKY) as u8,
        outcome: 0,
    };
    let mut skb_ref = SkbRef { skb: ctx.skb.skb };
    // SAFETY: callback and context are valid for the call's duration.
    let rc = unsafe {
        bpf_loop(
            MAX_MESSAGES as u32,
            walk_step as *mut core::ffi::c_void,
            &mut skb_ref as *mut SkbRef as *mut core::ffi::c_void,
            0,
        )
    };
    // SAFETY: per-CPU slot, written by the callback.
    let walk = unsafe { &(*scratch).walk };
    if rc < 0 || walk.outcome != WALK_DONE || walk.sql_count > 1 {
        return hold(state, seg.seq);
    }
    if walk.sql_count == 1 && !plain_read(ctx, walk.sql_at, walk.sql_len, walk.sql_is_parse != 0) {
        return hold(state, seg.seq);
    }
    state.next_msg_seq = seg.seq.wrapping_add(walk.off);
    Verdict::Pass
}

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
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
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

/// True only for the text of one `SELECT` or `SHOW` statement with no `;`
/// other than a final one followed by blanks only, no parenthesis (so no function call, subquery or VALUES list) and no
/// `INTO`/`FOR` word, after leading whitespace and comments. Nested block
/// comments are refused rather than followed.
#[inline(always)]
fn plain_read(ctx: &TcContext, at: u32, len: u32, is_parse: bool) -> bool {
    if len == 0 || len as usize > SCAN {
        return false;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // Keep the bound visible to the verifier: 1 <= n <= SCAN.
    let n = ((core::hint::black_box(len) - 1) & (SCAN as u32 - 1)) + 1;
    // SAFETY: the scratch buffer holds SCAN >= n bytes.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            at,
            (*scratch).buf.as_mut_ptr() as *mut _,
            n,
        )
    };
    if rc != 0 {
        return false;
    }
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
