//! When a ring-buffer record wakes the agent.
//!
//! A record submitted with default flags wakes a waiting consumer: the
//! producer raises an IRQ work item (an inter-processor interrupt, a VM exit
//! on a virtual machine) and the agent takes a context switch. At tens of
//! thousands of statements a second that cost more than everything else
//! qgate does (perf, pgbench -S at 8 clients: 9 % of all samples in
//! `native_write_msr` under `bpf_ringbuf_submit`, 10 % in task switches).
//! So ordinary records wake nobody: the agent drains the rings on its own
//! short timer (`capture::DRAIN_EVERY`). Two kinds of record still wake it
//! at once: one something waits on (a held segment, a stopped backend, a
//! connection's first record) and the one that fills a ring past
//! [`WAKE_FRACTION`], so a burst never waits for the timer to find room.
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    maps::RingBuf,
};

/// A ring this full (1/8) wakes the agent.
const WAKE_FRACTION: u64 = 8;

/// Whether records of `adding` bytes about to be sent to `ring` (of
/// `ring_bytes`) should wake the agent: when `urgent`, or when they take the
/// ring past its wake level. Asked once per segment or read, before its
/// records are reserved (the `bpf_loop` callbacks that reserve them have no
/// stack to spare).
#[inline(always)]
pub fn wakes(ring: &RingBuf, ring_bytes: u64, adding: u64, urgent: bool) -> bool {
    if urgent {
        return true;
    }
    let level = ring_bytes / WAKE_FRACTION;
    let avail = ring.query(BPF_RB_AVAIL_DATA as u64);
    avail < level && avail + adding >= level
}

/// Submit flags of a record: only the last of a segment's or read's records
/// may wake the agent, which acts on whole ones.
#[inline(always)]
pub fn submit_flags(wake: bool) -> u64 {
    if wake {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}
