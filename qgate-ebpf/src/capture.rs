//! Copying database segments to the agent through the `SEGMENTS` ring buffer.
//!
//! A segment's payload is sent as one or more records of two fixed sizes
//! (ring-buffer reservations must have a size known to the verifier): small
//! segments, the common case, take a small record; larger ones are cut into
//! 4 KiB chunks. Nothing is silently lost: a failed reservation, a failed
//! copy or a segment longer than the program copies is counted, and the last
//! two also reach the agent as a `TRUNCATED` record so it stops trusting the
//! stream.

use aya_ebpf::{
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_loop, bpf_skb_load_bytes},
    },
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use qgate_common::{
    flags, tcp_flags, Counters, SegmentEvent, SegmentRecord, CHUNK_LARGE, CHUNK_SMALL,
    DIR_TO_SERVER, MAX_CHUNKS,
};

use crate::{
    packet::{self, Segment, SkbRef},
    ring,
};

/// 32 MiB: about 8 000 full 4 KiB chunks or 100 000 small records in flight.
const SEGMENTS_BYTES: u32 = 32 << 20;

#[map(name = "SEGMENTS")]
static SEGMENTS: RingBuf = RingBuf::with_byte_size(SEGMENTS_BYTES, 0);

#[map(name = "DB_PORTS")]
static DB_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(64, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's counters (null only if the map is broken).
#[inline(always)]
pub fn counters() -> *mut Counters {
    COUNTERS.get_ptr_mut(0).unwrap_or(core::ptr::null_mut())
}

#[inline(always)]
pub fn count(f: impl FnOnce(&mut Counters)) {
    if let Some(c) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        f(unsafe { &mut *c });
    }
}

/// The database segment in this skb, if it is one: TCP to (`DIR_TO_SERVER`)
/// or from (`DIR_FROM_SERVER`) a configured port, with the port's
/// `port_kind`.
#[inline(always)]
pub fn db_segment(ctx: &TcContext, direction: u8) -> Option<(Segment, u8)> {
    let ports = packet::ports(ctx)?;
    let db_port = if direction == DIR_TO_SERVER {
        ports.dst_port
    } else {
        ports.src_port
    };
    // SAFETY: read-only lookup of a plain value.
    let kind = *unsafe { DB_PORTS.get(&db_port) }?;
    count(|c| c.segments_seen += 1);
    Some((packet::segment(ctx, &ports)?, kind))
}

/// Sends the segment to the agent unless it is a pure ACK (nothing in it
/// the agent needs). `extra_flags`: e.g. `flags::HELD`.
#[inline(always)]
pub fn capture(ctx: &TcContext, seg: &Segment, direction: u8, extra_flags: u32) {
    let control = seg.tcp_flags & (tcp_flags::SYN | tcp_flags::FIN | tcp_flags::RST) != 0;
    if seg.payload_len == 0 && !control {
        return;
    }
    emit_segment(ctx, seg, direction, extra_flags);
}

/// Where the chunking of one segment is. Kept in a map, not on the stack,
/// so the verifier sees unknown values and [`emit_step`] converges.
#[repr(C)]
struct Emit {
    header: SegmentEvent,
    payload_offset: u32,
    offset: u32,
    failed: u32,
    /// The segment's last record wakes the agent (see `ring`).
    wake: u32,
}

#[map(name = "EMIT")]
static EMIT: PerCpuArray<Emit> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn emit_segment(ctx: &TcContext, seg: &Segment, direction: u8, extra_flags: u32) {
    let Some(emit) = EMIT.get_ptr_mut(0) else {
        count(|c| c.ringbuf_full += 1);
        return;
    };
    // SAFETY: per-CPU slot, this program run is its only user.
    let emit = unsafe { &mut *emit };
    emit.header = SegmentEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        flow: seg.flow(direction == DIR_TO_SERVER),
        seq: seg.seq,
        ack: seg.ack,
        payload_len: seg.payload_len,
        chunk_offset: 0,
        chunk_len: 0,
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        flags: extra_flags,
        direction,
        tcp_flags: seg.tcp_flags,
        tcp_header_len: 0,
        _pad: [0; 5],
        tcp_header: [0; 64],
    };
    if direction == DIR_TO_SERVER && seg.tcp_header_len >= 20 {
        // Keep the bound visible to the verifier: 1 <= n <= 64.
        let n = ((core::hint::black_box(seg.tcp_header_len) - 1) & 63) + 1;
        // SAFETY: 64-byte destination, n <= 64.
        let rc = unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb as *const _,
                seg.tcp_offset,
                emit.header.tcp_header.as_mut_ptr() as *mut _,
                n,
            )
        };
        if rc == 0 {
            emit.header.tcp_header_len = n as u8;
        }
    }
    emit.payload_offset = seg.payload_offset;
    emit.offset = 0;
    emit.failed = 0;
    // A held segment waits for the agent, and a refused one may be a
    // connection waiting for a re-delivery: its last record wakes it.
    emit.wake = ring::wakes(
        &SEGMENTS,
        SEGMENTS_BYTES as u64,
        seg.payload_len as u64 + core::mem::size_of::<SegmentEvent>() as u64,
        extra_flags & (flags::HELD | flags::REFUSED) != 0,
    ) as u32;
    let mut skb_ref = SkbRef { skb: ctx.skb.skb };
    // SAFETY: callback and context are valid for the call's duration.
    unsafe {
        bpf_loop(
            MAX_CHUNKS as u32,
            emit_step as *mut core::ffi::c_void,
            &mut skb_ref as *mut SkbRef as *mut core::ffi::c_void,
            0,
        )
    };
    if emit.failed == 0 && emit.offset < emit.header.payload_len {
        count(|c| c.truncated += 1);
        emit_truncated(&emit.header, emit.offset, emit.wake != 0);
    }
}

/// `bpf_loop` callback: one ring-buffer record of the segment in `EMIT`.
extern "C" fn emit_step(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `SkbRef` on emit_segment's stack.
    let skb = unsafe { (*(ctx as *mut SkbRef)).skb };
    let Some(emit) = EMIT.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU slot, this program run is its only user.
    let emit = unsafe { &mut *emit };
    let remaining = emit.header.payload_len.saturating_sub(emit.offset);
    let sent = if remaining <= CHUNK_SMALL as u32 {
        emit_chunk::<CHUNK_SMALL>(skb, emit, remaining)
    } else {
        emit_chunk::<CHUNK_LARGE>(skb, emit, remaining)
    };
    match sent {
        Some(n) => {
            emit.offset += n;
            if emit.offset >= emit.header.payload_len {
                1
            } else {
                0
            }
        }
        None => {
            emit.failed = 1;
            1
        }
    }
}

/// Sends one record with up to `N` payload bytes from `offset`; returns how
/// many bytes it carried, `None` when the record could not be sent.
#[inline(always)]
fn emit_chunk<const N: usize>(
    skb: *mut aya_ebpf::bindings::__sk_buff,
    emit: &Emit,
    remaining: u32,
) -> Option<u32> {
    let header = &emit.header;
    let offset = emit.offset;
    let Some(mut entry) = SEGMENTS.reserve::<SegmentRecord<N>>(0) else {
        count(|c| c.ringbuf_full += 1);
        return None;
    };
    let len = if remaining > N as u32 {
        N as u32
    } else {
        remaining
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` points to a reserved, exclusively owned ring slot.
    unsafe {
        (*record).header = *header;
        (*record).header.chunk_offset = offset;
        (*record).header.chunk_len = len;
    }
    if len > 0 {
        // Keep the bound visible to the verifier: 1 <= n <= N (N a power of two).
        let n = ((core::hint::black_box(len) - 1) & (N as u32 - 1)) + 1;
        // SAFETY: the destination has N >= n bytes; the helper checks the skb side.
        let rc = unsafe {
            bpf_skb_load_bytes(
                skb as *const _,
                emit.payload_offset + offset,
                (*record).data.as_mut_ptr() as *mut _,
                n,
            )
        };
        if rc != 0 {
            entry.discard(0);
            count(|c| c.load_errors += 1);
            emit_truncated(header, offset, emit.wake != 0);
            return None;
        }
    }
    entry.submit(ring::submit_flags(emit.wake != 0 && len == remaining));
    Some(len)
}

/// Tells the agent the segment's payload from `offset` on was not delivered.
#[inline(always)]
fn emit_truncated(header: &SegmentEvent, offset: u32, wake: bool) {
    if let Some(mut entry) = SEGMENTS.reserve::<SegmentEvent>(0) {
        let mut h = *header;
        h.chunk_offset = offset;
        h.chunk_len = 0;
        h.flags = flags::TRUNCATED;
        entry.write(h);
        entry.submit(ring::submit_flags(wake));
    } else {
        count(|c| c.ringbuf_full += 1);
    }
}
