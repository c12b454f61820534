//! What qgate's eBPF programs cost, from the kernel's own accounting: each
//! program's run count and run time (`BPF_ENABLE_STATS`, on while a
//! [`KernelAccounting`] lives; the same figures `kernel.bpf_stats_enabled=1`
//! gives). The time a uprobe's trap takes before and after the program is
//! not in it: scenario 8 measures that as the backends' own CPU time.
use std::{collections::BTreeMap, os::fd::OwnedFd};

use anyhow::{Context, Result};
use aya::{
    programs::loaded_programs,
    sys::{enable_stats, Stats},
};

/// Keeps the kernel's per-program accounting on.
pub struct KernelAccounting {
    _fd: OwnedFd,
}

impl KernelAccounting {
    pub fn enable() -> Result<KernelAccounting> {
        let fd = enable_stats(Stats::RunTime).context("BPF_ENABLE_STATS")?;
        Ok(KernelAccounting { _fd: fd })
    }
}

/// Which of qgate's programs a figure sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    TcIngress,
    TcEgress,
    /// Every uprobe, uretprobe and tracepoint of the server hook.
    ServerHook,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::TcIngress => "tc ingress",
            Part::TcEgress => "tc egress",
            Part::ServerHook => "server hook probes",
        }
    }
}

/// Cumulative run time (ns) and runs of each part, at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot(BTreeMap<Part, (u64, u64)>);

impl Snapshot {
    /// qgate's loaded programs now (the kernel cuts names to 15 bytes:
    /// `qgate_secure_re…`; every `qgate_` program but the two tc ones is
    /// the server hook's).
    pub fn take() -> Snapshot {
        let mut parts = BTreeMap::new();
        for info in loaded_programs().flatten() {
            let Some(name) = info.name_as_str() else {
                continue;
            };
            if !name.starts_with("qgate_") {
                continue;
            }
            let part = match name {
                "qgate_ingress" => Part::TcIngress,
                "qgate_egress" => Part::TcEgress,
                _ => Part::ServerHook,
            };
            let e = parts.entry(part).or_insert((0, 0));
            e.0 += info.run_time().as_nanos() as u64;
            e.1 += info.run_count();
        }
        Snapshot(parts)
    }

    /// What ran between `before` and this snapshot: (ns, runs) per part.
    pub fn since(&self, before: &Snapshot) -> BTreeMap<Part, (u64, u64)> {
        self.0
            .iter()
            .map(|(part, &(ns, runs))| {
                let (ns0, runs0) = before.0.get(part).copied().unwrap_or_default();
                (*part, (ns.saturating_sub(ns0), runs.saturating_sub(runs0)))
            })
            .collect()
    }
}
