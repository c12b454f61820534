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
    bindings::TC_ACT_OK,
    helpers::{bpf_ktime_get_ns, generated::bpf_skb_load_bytes},
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use qgate_common::{
    flags, tcp_flags, Counters, SegmentEvent, SegmentRecord, CHUNK_LARGE, CHUNK_SMALL,
    DIR_TO_SERVER, MAX_CHUNKS,
};

use crate::packet::{self, Segment};

/// 32 MiB: about 8 000 full 4 KiB chunks or 100 000 small records in flight.
#[map(name = "SEGMENTS")]
static SEGMENTS: RingBuf = RingBuf::with_byte_size(32 << 20, 0);

#[map(name = "DB_PORTS")]
static DB_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(64, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn count(f: impl FnOnce(&mut Counters)) {
    if let Some(c) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        f(unsafe { &mut *c });
    }
}

/// Captures the segment if it belongs to a database connection. Returns the
/// tc action; capture itself never drops.
#[inline(always)]
pub fn try_capture(ctx: &TcContext, direction: u8) -> Result<i32, i32> {
    let Some(ports) = packet::ports(ctx) else {
        return Ok(TC_ACT_OK);
    };
    let to_server = direction == DIR_TO_SERVER;
    let db_port = if to_server {
        ports.dst_port
    } else {
        ports.src_port
    };
    // SAFETY: read-only lookup of a plain value.
    if unsafe { DB_PORTS.get(&db_port) }.is_none() {
        return Ok(TC_ACT_OK);
    }
    count(|c| c.segments_seen += 1);
    let seg = packet::segment(ctx, &ports).ok_or(TC_ACT_OK)?;
    // Pure ACKs carry nothing the agent needs.
    let control = seg.tcp_flags & (tcp_flags::SYN | tcp_flags::FIN | tcp_flags::RST) != 0;
    if seg.payload_len == 0 && !control {
        return Ok(TC_ACT_OK);
    }
    emit_segment(ctx, &seg, direction);
    Ok(TC_ACT_OK)
}

#[inline(always)]
fn emit_segment(ctx: &TcContext, seg: &Segment, direction: u8) {
    let header = SegmentEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        flow: seg.flow(direction == DIR_TO_SERVER),
        seq: seg.seq,
        ack: seg.ack,
        payload_len: seg.payload_len,
        chunk_offset: 0,
        chunk_len: 0,
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        flags: 0,
        direction,
        tcp_flags: seg.tcp_flags,
        _pad: [0; 6],
    };
    let mut offset: u32 = 0;
    for _ in 0..MAX_CHUNKS {
        let remaining = seg.payload_len - offset;
        let sent = if remaining <= CHUNK_SMALL as u32 {
            emit_chunk::<CHUNK_SMALL>(ctx, seg, &header, offset, remaining)
        } else {
            emit_chunk::<CHUNK_LARGE>(ctx, seg, &header, offset, remaining)
        };
        match sent {
            Some(n) => offset += n,
            None => return,
        }
        if offset >= seg.payload_len {
            return;
        }
    }
    count(|c| c.truncated += 1);
    emit_truncated(&header, offset);
}

/// Sends one record with up to `N` payload bytes from `offset`; returns how
/// many bytes it carried, `None` when the record could not be sent.
#[inline(always)]
fn emit_chunk<const N: usize>(
    ctx: &TcContext,
    seg: &Segment,
    header: &SegmentEvent,
    offset: u32,
    remaining: u32,
) -> Option<u32> {
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
                ctx.skb.skb as *const _,
                seg.payload_offset + offset,
                (*record).data.as_mut_ptr() as *mut _,
                n,
            )
        };
        if rc != 0 {
            entry.discard(0);
            count(|c| c.load_errors += 1);
            emit_truncated(header, offset);
            return None;
        }
    }
    entry.submit(0);
    Some(len)
}

/// Tells the agent the segment's payload from `offset` on was not delivered.
#[inline(always)]
fn emit_truncated(header: &SegmentEvent, offset: u32) {
    if let Some(mut entry) = SEGMENTS.reserve::<SegmentEvent>(0) {
        let mut h = *header;
        h.chunk_offset = offset;
        h.chunk_len = 0;
        h.flags = flags::TRUNCATED;
        entry.write(h);
        entry.submit(0);
    } else {
        count(|c| c.ringbuf_full += 1);
    }
}
