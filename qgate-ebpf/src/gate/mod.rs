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
//!
//! | module | does |
//! | --- | --- |
//! | this one | the flow's state, the verdict for each segment |
//! | `startup` | a connection's first packet: StartupMessage, SSL/GSSENC requests, TLS |
//! | `walk` | the message walk over a segment's headers, and the plain-read proof |
mod startup;
mod walk;

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, LruHashMap},
    programs::TcContext,
};
use qgate_common::{
    known, mode, phase, tcp::seq_lt, tcp_flags, Counters, FlowKey, FlowState, GateConfig,
};

use self::{
    startup::startup,
    walk::{messages, mysql_packet},
};
use crate::{capture::count, packet::Segment};

#[map(name = "FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "GATE_CONFIG")]
static GATE_CONFIG: Array<GateConfig> = Array::with_max_entries(1, 0);

pub enum Verdict {
    /// Let it through.
    Pass,
    /// Drop it and tell the agent: it waits for a decision.
    Hold,
    /// Drop it silently: an original of a statement that was denied.
    Drop,
    /// Drop it, count it, and show it to the agent: a new copy of bytes
    /// already let through that the server has not acknowledged.
    Refuse,
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
/// hook's, so the tc programs leave it alone.
///
/// `every_session` (`port_kind::HOOKED_ALL`): the hook reads every session
/// that starts after it attached; a SYN makes a connection the hook's.
/// Otherwise (`port_kind::HOOKED`) only a session whose server accepted TLS
/// or GSSAPI encryption is ([`hand_over_encrypted`]), and never from a SYN:
/// a new connection on the same addresses (or a forged SYN naming them)
/// starts on the wire path (`decide` treats a SYN on a live flow as not to
/// be trusted), so nothing plaintext ever passes as the hook's.
#[inline(always)]
pub fn left_to_hook(seg: &Segment, flow: &FlowKey, every_session: bool, to_server: bool) -> bool {
    if to_server && seg.tcp_flags & tcp_flags::SYN != 0 {
        if let Some(state) = FLOWS.get_ptr(flow) {
            // A SYN on a flow the wire path gates (a session older than the
            // hook, or a forged SYN naming it) never hands it to the hook:
            // the hook does not read that backend, and the session would
            // run ungated. `decide` treats it as a SYN on a live flow.
            // SAFETY: read of a plain byte of a map value.
            return every_session && unsafe { (*state).phase == phase::HOOKED };
        }
        if !every_session {
            return false;
        }
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
        // Older than the program: the wire path picks it up mid-stream
        // (its answers are the hook's when it reads every session).
        None => every_session && !to_server,
    }
}

/// tc egress on a port the server hook reads: the server's first payloads.
/// A lone `S` or `G` (after any lone `N`s) can only be its answer to an
/// SSLRequest or GSSENCRequest (its first message is otherwise an
/// authentication request or an error, nine bytes or more): the backend calls `secure_open_server`
/// / `secure_open_gssapi` next, where it stops until the agent attached the
/// session probes to it (`hook::on_encryption`), so the encrypted stream is
/// the hook's to read and passes here uncaptured. Anything else (`N`, an
/// error, a startup answered): the session goes on in plain, gated here.
#[inline(always)]
pub fn hand_over_encrypted(ctx: &TcContext, seg: &Segment, flow: &FlowKey) {
    if seg.payload_len == 0 {
        return;
    }
    let Some(state) = FLOWS.get_ptr_mut(flow) else {
        return;
    };
    // SAFETY: map value; plain integers.
    let state = unsafe { &mut *state };
    if state.phase != phase::STARTUP || state.known & known::SERVER_SPOKE != 0 {
        return;
    }
    let answer = ctx.load::<u8>(seg.payload_offset as usize).unwrap_or(0);
    match (seg.payload_len, answer) {
        (1, b'S') | (1, b'G') => state.phase = phase::HOOKED,
        // No to a GSSENCRequest: libpq may ask for TLS next.
        (1, b'N') => {}
        _ => state.known |= known::SERVER_SPOKE,
    }
}

#[inline(always)]
fn hold(state: &mut FlowState, seq: u32) -> Verdict {
    state.held = 1;
    state.tail = 0;
    state.hold_seq = seq;
    Verdict::Hold
}

/// `mysql`: the port speaks MySQL (`port_kind::MYSQL`): its own packet
/// walk (`walk::mysql_packet`), never the PostgreSQL one.
pub fn verdict(
    ctx: &TcContext,
    seg: &Segment,
    flow: &FlowKey,
    counters: *mut Counters,
    mysql: bool,
) -> Verdict {
    let cfg = config();
    let v = decide(ctx, seg, flow, &cfg, mysql);
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
fn decide(
    ctx: &TcContext,
    seg: &Segment,
    flow: &FlowKey,
    cfg: &GateConfig,
    mysql: bool,
) -> Verdict {
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
    let verdict = decide_flow(ctx, seg, state, cfg, end, mysql);
    if matches!(verdict, Verdict::Pass)
        && (state.known & known::PASSED_END == 0 || seq_lt(state.passed_end, end))
    {
        state.passed_end = end;
        state.known |= known::PASSED_END;
    }
    verdict
}

/// A client segment that overlaps bytes this program already let through
/// and the server has not acknowledged: the server may not have them (its
/// TCP dropped the first copy after tc: a bad checksum, an old timestamp,
/// memory pressure), and then it takes these bytes, which nobody judged,
/// in their place. Refused (dropped, counted and shown to the agent, which
/// re-delivers its own copy of bytes it re-injected): a copy of what the
/// server already acknowledged is harmless (its TCP discards it), and
/// everything past what was let through is judged as usual.
#[inline(always)]
fn unjudged_retransmission(seg: &Segment, state: &FlowState, end: u32) -> bool {
    if state.known & known::PASSED_END == 0 || !seq_lt(seg.seq, state.passed_end) {
        return false;
    }
    let overlap_end = if seq_lt(end, state.passed_end) {
        end
    } else {
        state.passed_end
    };
    state.known & known::SERVER_ACK == 0 || seq_lt(state.server_ack, overlap_end)
}

/// The server acknowledged up to `ack` (a segment it sent, tc egress).
#[inline(always)]
pub fn server_acked(flow: &FlowKey, ack: u32) {
    if let Some(state) = FLOWS.get_ptr_mut(flow) {
        // SAFETY: map value; plain integers.
        let state = unsafe { &mut *state };
        if state.known & known::SERVER_ACK == 0 || seq_lt(state.server_ack, ack) {
            state.server_ack = ack;
            state.known |= known::SERVER_ACK;
        }
    }
}

#[inline(always)]
fn decide_flow(
    ctx: &TcContext,
    seg: &Segment,
    state: &mut FlowState,
    cfg: &GateConfig,
    end: u32,
    mysql: bool,
) -> Verdict {
    if state.mode != mode::MONITOR
        && state.phase != phase::OPAQUE
        && unjudged_retransmission(seg, state, end)
    {
        count(|c| c.refused_segments += 1);
        return Verdict::Refuse;
    }
    if state.deny_start != state.deny_end
        && seq_lt(seg.seq, state.deny_end)
        && seq_lt(state.deny_start, end)
    {
        return Verdict::Drop;
    }
    if state.held != 0 {
        // Tail mode, the tail not reached in order yet: `pass_until` is the
        // end of what passed, `hold_seq` the tail.
        let before_tail = state.tail != 0 && seq_lt(state.pass_until, state.hold_seq);
        if before_tail && seq_lt(state.pass_until, seg.seq) {
            // Out of order before the tail (a hole before it), whether or
            // not it reaches the tail: dropped, as if lost. The server's
            // reassembly of out-of-order overlaps need not match the
            // agent's, so it gets no byte past a hole; the client sends
            // these again once the server's acknowledgments show the hole,
            // and they pass in order. Holding them instead (from here on)
            // held the rest of a long message too, and a client whose
            // window was full of those unacknowledged bytes never sent its
            // end: the statement was never seen whole and the connection
            // waited forever (seen with a 1 MiB INSERT on a 2-CPU veth).
            return Verdict::Drop;
        }
        if seq_lt(state.hold_seq, end) {
            if before_tail {
                // It reaches the tail from where the passed bytes end:
                // every byte from there waits now, or a shorter copy of
                // its start (ending before the tail) would pass after it
                // and the server would take those bytes instead of the
                // held ones the agent judged.
                state.hold_seq = state.pass_until;
            }
            return Verdict::Hold;
        }
        if state.tail != 0 {
            if seq_lt(state.pass_until, end) {
                state.pass_until = end;
            }
            return Verdict::Pass;
        }
        // Before the hold: only a copy of bytes already let through may
        // pass. Bytes never let through were never walked either (the hold
        // of a connection seen mid-stream, of a denied identity, or one
        // that began at a segment that came early): held, and if the
        // agent's held bytes start after them the session waits (fails
        // closed) rather than the server running them unjudged.
        if state.known & known::PASSED_END == 0 || seq_lt(state.passed_end, end) {
            return Verdict::Hold;
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
        // A gap: bytes the program never inspected went missing or out of
        // order. The hold starts at the next header, not at this segment:
        // the missing bytes, when they come, are held too (held from here,
        // they would pass as "before the hold", never walked).
        return hold(state, state.next_msg_seq);
    }
    let first = state.next_msg_seq.wrapping_sub(seg.seq);
    let verdict = match state.phase {
        // MySQL: one command packet per segment, once the agent has let
        // the login through (`READY`); the agent decodes and decides the
        // rest (the hold starts at the next packet, below).
        phase::READY if mysql => mysql_packet(ctx, seg, state, first),
        _ if mysql => hold(state, seg.seq),
        phase::STARTUP => startup(ctx, seg, state, cfg, first),
        phase::READY => messages(ctx, seg, state, first),
        _ => hold(state, seg.seq),
    };
    if matches!(verdict, Verdict::Hold)
        && state.tail == 0
        && seq_lt(state.hold_seq, state.next_msg_seq)
    {
        // A segment straddling the next header: the bytes before it were
        // walked and passed; the hold starts at the header.
        state.hold_seq = state.next_msg_seq;
    }
    verdict
}
