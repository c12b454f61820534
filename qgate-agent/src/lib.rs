//! qgate's agent, stage by stage.
//!
//! | stage | module | does |
//! | --- | --- | --- |
//! | capture | [`capture`] | loads the tc programs, reads segments from the kernel or a pcap |
//! | wire | [`wire`] | reassembles TCP streams, decodes the PostgreSQL protocol |
//! | classify | [`classify`] | parses statements (sqlparser) into facts |
//! | policy | [`policy`] | facts + identity → allow / hold / deny |
//! | store | [`store`] | SQLite: connections, statements, requests, audit |
//! | api | [`api`] | the reviewers' HTTP API |
//! | (shared) | [`board`] | held requests: create, decide, watch (the gate and the API both use it) |
//! | (shared) | [`flow`] | what names a connection ([`flow::Flow`]), its direction and transport |
//! | (shared) | [`clock`] | the one time type ([`clock::UnixNanos`]), its text forms |
//! | (shared) | [`bpf`] | the gating maps and the programs' clock, shared by capture and gate |
//!
//! [`pipeline`] connects the stages; [`cli`] is the command line.
pub mod agent;
pub mod api;
pub mod board;
pub mod bpf;
pub mod capture;
pub mod catalog;
pub mod classify;
pub mod cli;
pub mod clock;
pub mod config;
pub mod flow;
pub mod gate;
pub mod pipeline;
pub mod policy;
pub mod store;
pub mod wire;

/// The maps on the per-statement path (connections by flow, backends by
/// pid): std's SipHash was 3–4 % of the agent's time (perf, pgbench -S).
/// foldhash's quality variant keeps a per-process random seed.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::quality::RandomState>;
pub type FastSet<K> = std::collections::HashSet<K, foldhash::quality::RandomState>;

/// True if `text` contains `needle` (ASCII letters compared without case),
/// without the lower-cased copy of `text` that `to_ascii_lowercase` makes:
/// asked of every MySQL statement judged.
pub fn contains_ignoring_case(text: &str, needle: &str) -> bool {
    let needle = needle.as_bytes();
    needle.is_empty()
        || text
            .as_bytes()
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
}

/// The calling thread's niceness.
pub fn thread_nice() -> Option<i32> {
    // getpriority(2) may return -1 as a niceness: errno tells.
    // SAFETY: errno is this thread's; plain getpriority on the calling thread.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: plain getpriority(2) on the calling thread (who = 0).
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    (nice != -1 || std::io::Error::last_os_error().raw_os_error() == Some(0)).then_some(nice)
}

/// Sets the calling thread's niceness (on Linux, `PRIO_PROCESS` with 0 is
/// the calling thread; threads started later inherit it).
pub fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: plain setpriority(2) on the calling thread (who = 0).
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn contains_ignoring_case_compares_ascii_letters_only() {
        assert!(super::contains_ignoring_case("SET GLOBAL x = 1", "global"));
        assert!(super::contains_ignoring_case("select 1; UsE db", "use"));
        assert!(!super::contains_ignoring_case("SELECT 'glob al'", "global"));
        assert!(!super::contains_ignoring_case("us", "use"));
        assert!(super::contains_ignoring_case("", ""));
    }
}
