//! What capture and gate share about the kernel programs, so that neither
//! imports the other: the gating maps' agent side ([`maps::KernelGate`],
//! [`crate::flow::GateMode`]) and the programs' clock ([`monotonic_ns`]).
//! `capture` loads the programs and hands the maps over; `gate` writes them.
pub mod maps;

pub use maps::KernelGate;

/// CLOCK_MONOTONIC now: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}
