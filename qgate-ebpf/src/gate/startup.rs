//! A connection's first packet: StartupMessage, SSLRequest, GSSENCRequest,
//! CancelRequest, or (after the server said `S`) a TLS handshake.
use aya_ebpf::programs::TcContext;
use qgate_common::{
    pg::{GSSENC_REQUEST, MAX_STARTUP_LEN, SSL_REQUEST},
    phase, FlowState, GateConfig,
};

use super::{hold, Verdict};
use crate::packet::Segment;

/// First byte of a TLS record of type handshake (RFC 8446 §5.1).
const TLS_HANDSHAKE: u8 = 0x16;

/// The first packet of a connection: StartupMessage, SSLRequest,
/// GSSENCRequest, CancelRequest, or (after the server said `S`) TLS.
#[inline(always)]
pub(super) fn startup(
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
