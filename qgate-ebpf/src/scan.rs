//! Proving a statement text harmless without the agent: one plain `SELECT`
//! or `SHOW`. Shared by the tc gate (bytes from the skb) and the server hook
//! (bytes from the backend's receive buffer); both copy the text into this
//! module's per-CPU buffer and call [`harmless`].
use aya_ebpf::{helpers::generated::bpf_loop, macros::map, maps::PerCpuArray};
use qgate_common::scan::Scan;

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

/// Characters per `bpf_loop` iteration: each iteration pays a callback call
/// and a map lookup. Eight at a time took what the tc ingress program
/// spends on a `pgbench -S` read beyond the egress program's run (the scan,
/// mostly) from 890 to 700 ns (`kernel.bpf_stats_enabled`, hook off, the
/// default policy, 8 clients, five alternated pairs).
const STRIDE: usize = 8;

/// `bpf_loop` callback: the scratch buffer's characters `index * STRIDE`
/// to `index * STRIDE + STRIDE - 1`.
extern "C" fn scan_step(index: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(scratch) = SCAN_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU slot, this program run is its only user.
    let (buf, scan) = unsafe { (&(*scratch).buf, &mut (*scratch).scan) };
    let first = (index as usize).wrapping_mul(STRIDE);
    for k in 0..STRIDE {
        let i = first.wrapping_add(k);
        if i >= scan.n as usize {
            return 1;
        }
        if !scan.step(buf[i & SCAN_MASK]) {
            return 1;
        }
    }
    0
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
    run(Scan::new(n, is_parse))
}

/// [`harmless`] for a MySQL `COM_QUERY` text (`Scan::mysql`).
#[inline(always)]
pub fn harmless_mysql(n: u32) -> bool {
    run(Scan::mysql(n))
}

#[inline(always)]
fn run(fresh: Scan) -> bool {
    let Some(scratch) = SCAN_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let n = fresh.n;
    // SAFETY: per-CPU slot, this program run is its only user.
    let scan = unsafe { &mut (*scratch).scan };
    *scan = fresh;
    // SAFETY: callback and context are valid for the call's duration.
    let rc = unsafe {
        bpf_loop(
            n.div_ceil(STRIDE as u32),
            scan_step as *mut core::ffi::c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    // SAFETY: per-CPU slot, written by the callback.
    rc >= 0 && unsafe { (*scratch).scan.harmless() }
}
