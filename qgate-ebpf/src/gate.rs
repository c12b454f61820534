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
use qgate_common::{
    mode,
    pg::{GSSENC_REQUEST, MAX_MESSAGE_LEN, MAX_STARTUP_LEN, SSL_REQUEST},
    phase,
    tcp::seq_lt,
    tcp_flags, Counters, FlowKey, FlowState, GateConfig,
};

use crate::{
    packet::{Segment, SkbRef},
    scan,
};

#[map(name = "FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "GATE_CONFIG")]
static GATE_CONFIG: Array<GateConfig> = Array::with_max_entries(1, 0);

/// Per-CPU working memory. The walk state lives here rather than on the
/// stack on purpose: values read back from a map are unknown to the
/// verifier, so the `bpf_loop` callback converges after a few iterations
/// instead of being explored once per possible constant.
#[repr(C)]
struct Scratch {
    walk: Walk,
}

#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Messages per segment the program walks; a segment with more is held.
const MAX_MESSAGES: usize = 24;

/// A Query or Parse longer than its segment is held by its end, not its
/// start: segments before its last `TAIL` bytes pass (the server reads a
/// whole message before it parses any of it, so none of it runs), the ones
/// holding those bytes wait for the agent, which sees every byte (the
/// capture copies what passes too) and decides on the whole text. Holding
/// its start instead stalls the client once its congestion window is full
/// of unacknowledged bytes, and the agent never sees the statement whole.
/// 64 bytes leave room for a denial that makes the whole string fail to
/// parse (the agent rewrites the held end).
const TAIL: u32 = 64;

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

#[inline(always)]
pub fn config() -> GateConfig {
    GATE_CONFIG.get(0).copied().unwrap_or_default()
}

/// The agent's heartbeat is older than it may be.
#[inline(always)]
pub fn agent_gone(cfg: &GateConfig) -> bool {
    let now = unsafe { bpf_ktime_get_ns() };
    now.saturating_sub(cfg.heartbeat_ns) > cfg.fail_after_ns
}

/// On a port the server hook reads: true when the connection is the
/// hook's (it started after the port became hooked), so the tc programs
/// leave it alone. A SYN on such a port makes a connection the hook's.
#[inline(always)]
pub fn left_to_hook(seg: &Segment, flow: &FlowKey, to_server: bool) -> bool {
    if to_server && seg.tcp_flags & tcp_flags::SYN != 0 {
        let state = FlowState {
            phase: phase::HOOKED,
            ..FlowState::default()
        };
        let _ = FLOWS.insert(flow, &state, 0);
        return true;
    }
    match FLOWS.get_ptr(flow) {
        // SAFETY: read of a plain byte of a map value.
        Some(state) => unsafe { (*state).phase == phase::HOOKED },
        // Older than the program: the wire path picks it up mid-stream.
        None => !to_server,
    }
}

#[inline(always)]
fn hold(state: &mut FlowState, seq: u32) -> Verdict {
    state.held = 1;
    state.tail = 0;
    state.hold_seq = seq;
    Verdict::Hold
}

pub fn verdict(ctx: &TcContext, seg: &Segment, flow: &FlowKey, counters: *mut Counters) -> Verdict {
    let cfg = config();
    let v = decide(ctx, seg, flow, &cfg);
    if !matches!(v, Verdict::Hold) || cfg.fail_open == 0 {
        return v;
    }
    if !agent_gone(&cfg) {
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
        if let Some(state) = FLOWS.get_ptr_mut(flow) {
            // SAFETY: map value; plain integers.
            let state = unsafe { &mut *state };
            if state.isn == seg.seq {
                // The same SYN again (a retransmission, possibly late).
                return Verdict::Pass;
            }
            // Another SYN on a flow already under way: the server ignores it
            // (or, for a new connection on a reused address, accepts it);
            // either way its sequence number is not trusted. Nothing passes
            // on its own until the agent, which sees the server's answer,
            // re-syncs.
            state.phase = phase::UNSYNCED;
            state.isn = seg.seq;
            return Verdict::Pass;
        }
        let state = FlowState {
            next_msg_seq: seg.seq.wrapping_add(1),
            isn: seg.seq,
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
        if seq_lt(state.hold_seq, end) {
            return Verdict::Hold;
        }
        if state.tail != 0 {
            if seq_lt(state.pass_until, seg.seq) {
                // Out of order before the tail: held from here on.
                return hold(state, seg.seq);
            }
            if seq_lt(state.pass_until, end) {
                state.pass_until = end;
            }
        }
        return Verdict::Pass;
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
        if cfg.hold_encryption != 0 {
            // The server said yes to TLS: the agent refuses what it will
            // not be able to read, before the handshake.
            return hold(state, seg.seq);
        }
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
    if cfg.hold_startup != 0 || len < 8 || len > MAX_STARTUP_LEN {
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
    /// 1: hold the segment; 2: walked to the end; 3: a Query or Parse
    /// runs past the segment, ending at `tail_end` (see [`TAIL`]).
    outcome: u8,
    /// Payload offset one past the long message's last byte (`WALK_TAIL`).
    tail_end: u32,
}

const WALK_HOLD: u8 = 1;
const WALK_DONE: u8 = 2;
const WALK_TAIL: u8 = 3;

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
    if !(4..=MAX_MESSAGE_LEN).contains(&len) {
        w.outcome = WALK_HOLD;
        return 1;
    }
    match ty {
        // Query, Parse: carry SQL text.
        b'Q' | b'P' => {
            if w.off + 1 + len > w.payload_len {
                // Longer than what is left of the segment: held by its end
                // when it is the segment's only SQL and long enough to have
                // an end apart from its start.
                w.outcome = if w.sql_count == 0 && len > 2 * TAIL {
                    w.tail_end = w.off + 1 + len;
                    WALK_TAIL
                } else {
                    WALK_HOLD
                };
                return 1;
            }
            if w.risky_only == 0 {
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
        tail_end: 0,
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
    if rc >= 0 && walk.outcome == WALK_TAIL {
        let message_end = seg.seq.wrapping_add(walk.tail_end);
        let tail = message_end.wrapping_sub(TAIL);
        if !seq_lt(tail, seg.seq.wrapping_add(seg.payload_len)) {
            // This segment ends before the tail: it passes, and so do the
            // ones after it, up to the segment that reaches the tail.
            state.held = 1;
            state.tail = 1;
            state.hold_seq = tail;
            state.pass_until = seg.seq.wrapping_add(seg.payload_len);
            state.next_msg_seq = message_end;
            return Verdict::Pass;
        }
        return hold(state, seg.seq);
    }
    if rc < 0 || walk.outcome != WALK_DONE || walk.sql_count > 1 {
        return hold(state, seg.seq);
    }
    if walk.sql_count == 1 && !plain_read(ctx, walk.sql_at, walk.sql_len, walk.sql_is_parse != 0) {
        return hold(state, seg.seq);
    }
    state.next_msg_seq = seg.seq.wrapping_add(walk.off);
    Verdict::Pass
}

/// Copies the statement text out of the skb and asks [`scan::harmless`].
#[inline(always)]
fn plain_read(ctx: &TcContext, at: u32, len: u32, is_parse: bool) -> bool {
    let Some((buf, n)) = scan::buffer(len) else {
        return false;
    };
    // SAFETY: the scan buffer holds SCAN >= n bytes.
    let rc = unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const _, at, buf as *mut _, n) };
    rc == 0 && scan::harmless(n, is_parse)
}
