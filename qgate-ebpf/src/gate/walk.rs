//! The message walk: a segment's PostgreSQL message headers, one per
//! `bpf_loop` step, and the plain-read proof of the one SQL message a
//! segment may carry; a Query or Parse longer than its segment is held by
//! its end ([`TAIL`]). For MySQL ([`mysql_packet`]): one command packet
//! per segment, a `COM_QUERY` proven a plain read or a `COM_PING` passes.
use aya_ebpf::{
    helpers::generated::{bpf_loop, bpf_skb_load_bytes},
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use qgate_common::{mode, pg::MAX_MESSAGE_LEN, tcp::seq_lt, FlowState};

use super::{hold, Verdict};
use crate::{
    packet::{Segment, SkbRef},
    scan,
};

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
pub(super) fn messages(
    ctx: &TcContext,
    seg: &Segment,
    state: &mut FlowState,
    first: u32,
) -> Verdict {
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
        return hold_by_tail(seg, state, seg.seq.wrapping_add(walk.tail_end));
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

/// `COM_QUERY` and `COM_PING` (MySQL Client/Server Protocol, "Command
/// Phase").
const COM_QUERY: u8 = 0x03;
const COM_PING: u8 = 0x0e;
/// `COM_STMT_EXECUTE` … `COM_STMT_RESET` (0x17–0x1a) and `COM_STMT_FETCH`.
const COM_STMT_EXECUTE: u8 = 0x17;
const COM_STMT_RESET: u8 = 0x1a;
const COM_STMT_FETCH: u8 = 0x1c;
/// A payload this long is continued by the next packet.
const MYSQL_MAX_PAYLOAD: u32 = 0xFF_FFFF;

/// A MySQL segment from its next packet header at `first`: passes only when
/// it is one whole command packet (sequence id 0) that is a `COM_PING`, or,
/// for `GATE_RISKY`, a `COM_QUERY` whose text is provably one plain read
/// ([`scan::harmless_mysql`]) or the execute (fetch, long data, reset,
/// close) of a prepared statement in a session whose every prepare the
/// agent judged; a `COM_QUERY` longer than the segment is held by its end
/// ([`TAIL`]). Everything else waits for the agent: a login, authentication
/// data (sequence ids above 0), a prepare, any other command, two packets
/// in one segment.
#[inline(always)]
pub(super) fn mysql_packet(
    ctx: &TcContext,
    seg: &Segment,
    state: &mut FlowState,
    first: u32,
) -> Verdict {
    if first + 5 > seg.payload_len {
        return hold(state, seg.seq);
    }
    let mut header = [0u8; 5];
    // SAFETY: 5 bytes into a 5-byte stack buffer; the helper checks the skb side.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            seg.payload_offset + first,
            header.as_mut_ptr() as *mut _,
            5,
        )
    };
    if rc != 0 {
        return hold(state, seg.seq);
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], 0]);
    let (seq, command) = (header[3], header[4]);
    if seq != 0 || len == 0 || len >= MYSQL_MAX_PAYLOAD {
        return hold(state, seg.seq);
    }
    let end = first + 4 + len;
    if end > seg.payload_len {
        if command == COM_QUERY && len > 2 * TAIL && state.mode == mode::GATE_RISKY {
            // As for a long PostgreSQL Query: the server parses nothing of
            // a packet before it has it whole.
            return hold_by_tail(seg, state, seg.seq.wrapping_add(end));
        }
        return hold(state, seg.seq);
    }
    if end != seg.payload_len {
        return hold(state, seg.seq);
    }
    let harmless = match command {
        // Only a ping's one byte: a longer "ping" out of sequence is a
        // header whose body MariaDB may read as the next packet.
        COM_PING => len == 1 && state.mode != mode::GATE_ALL,
        // A statement id only a judged prepare gave out (see
        // `FlowState::mysql_prepared_judged`).
        COM_STMT_EXECUTE..=COM_STMT_RESET | COM_STMT_FETCH => {
            state.mode == mode::GATE_RISKY && state.mysql_prepared_judged != 0
        }
        COM_QUERY => {
            state.mode == mode::GATE_RISKY
                && plain_mysql_read(ctx, seg.payload_offset + first + 5, len - 1)
        }
        _ => false,
    };
    if !harmless {
        return hold(state, seg.seq);
    }
    state.next_msg_seq = seg.seq.wrapping_add(end);
    Verdict::Pass
}

#[inline(always)]
fn plain_mysql_read(ctx: &TcContext, at: u32, len: u32) -> bool {
    let Some((buf, n)) = scan::buffer(len) else {
        return false;
    };
    // SAFETY: the scan buffer holds SCAN >= n bytes.
    let rc = unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const _, at, buf as *mut _, n) };
    rc == 0 && scan::harmless_mysql(n)
}

/// A message ending at `message_end`, past this segment: held by its end
/// ([`TAIL`]). When this segment ends before the tail it passes, and so do
/// the ones after it, up to the segment that reaches the tail.
#[inline(always)]
fn hold_by_tail(seg: &Segment, state: &mut FlowState, message_end: u32) -> Verdict {
    let tail = message_end.wrapping_sub(TAIL);
    if seq_lt(tail, seg.seq.wrapping_add(seg.payload_len)) {
        return hold(state, seg.seq);
    }
    state.held = 1;
    state.tail = 1;
    state.hold_seq = tail;
    state.pass_until = seg.seq.wrapping_add(seg.payload_len);
    state.next_msg_seq = message_end;
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
