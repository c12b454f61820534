//! The table and the JSON file under `target/bench/`.
use std::{fs, path::Path, time::SystemTime};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::stats::Spread;

/// Where the numbers come from: every row names it, so tables from
/// different hosts can sit side by side without being confused.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_gib: f64,
}

impl Machine {
    pub fn this() -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, name)| name.trim().to_owned())
            .unwrap_or_else(|| "unknown CPU".into());
        let cores = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let memory_gib = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|kib| kib.parse::<f64>().ok())
            })
            .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
        Machine {
            cpu,
            cores,
            kernel,
            memory_gib,
        }
    }

    /// "AMD EPYC, 2 cores, Linux 6.18.44"
    pub fn short(&self) -> String {
        format!("{}, {} cores, Linux {}", self.cpu, self.cores, self.kernel)
    }

    fn json(&self) -> Value {
        json!({
            "cpu": self.cpu,
            "cores": self.cores,
            "kernel": self.kernel,
            "memory_gib": (self.memory_gib * 10.0).round() / 10.0,
        })
    }
}

/// One measured figure: the median over the pairs (or repetitions) and its
/// range, what it is compared against, and the target if the issue set one.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: u8,
    pub case: String,
    pub metric: String,
    pub unit: &'static str,
    pub value: Spread,
    /// e.g. "≥ 0.99"; with `met` when there is a target.
    pub target: Option<String>,
    pub met: Option<bool>,
    /// Absolute numbers behind a ratio, for the reader who wants them.
    pub detail: String,
}

/// A scenario (or one leg of it) that did not produce numbers.
#[derive(Debug, Clone)]
pub struct Failure {
    pub scenario: u8,
    pub what: String,
}

pub struct Report {
    pub machine: Machine,
    pub quick: bool,
    pub commit: String,
    pub started: SystemTime,
    pub rows: Vec<Row>,
    pub failures: Vec<Failure>,
    pub notes: Vec<String>,
}

fn fmt(v: f64, unit: &str) -> String {
    if !v.is_finite() {
        return "—".into();
    }
    let digits = match unit {
        "×" => 3,
        _ if v.abs() >= 1000.0 => 0,
        _ if v.abs() >= 10.0 => 1,
        _ => 2,
    };
    format!("{v:.digits$}")
}

pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        md.push_str(&format!(
            "### qgate bench ({}), commit {}\n\nMachine: {} ({:.1} GiB). Each figure is the median over alternated pairs (range in brackets).\n\n",
            if self.quick { "--quick" } else { "full" },
            self.commit,
            self.machine.short(),
            self.machine.memory_gib,
        ));
        md.push_str(
            "| # | case | metric | median [min – max] | n | target | met | measured | machine |\n",
        );
        md.push_str("| - | --- | --- | --- | - | --- | --- | --- | --- |\n");
        for r in &self.rows {
            let u = if r.unit.is_empty() {
                String::new()
            } else {
                format!(" {}", r.unit)
            };
            md.push_str(&format!(
                "| {} | {} | {} | {}{u} [{} – {}] | {} | {} | {} | {} | {} |\n",
                r.scenario,
                r.case,
                r.metric,
                fmt(r.value.median, r.unit),
                fmt(r.value.min, r.unit),
                fmt(r.value.max, r.unit),
                r.value.n,
                r.target.as_deref().unwrap_or(""),
                match r.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "",
                },
                r.detail,
                self.machine.short(),
            ));
        }
        if !self.failures.is_empty() {
            md.push_str("\nNot measured:\n\n");
            for f in &self.failures {
                md.push_str(&format!(
                    "- scenario {}: {}\n",
                    f.scenario,
                    f.what.replace('\n', " ")
                ));
            }
        }
        if !self.notes.is_empty() {
            md.push('\n');
            for n in &self.notes {
                md.push_str(&format!("- {n}\n"));
            }
        }
        md
    }

    pub fn json(&self) -> Value {
        let machine = self.machine.json();
        json!({
            "started_at_unix": unix_seconds(self.started),
            "quick": self.quick,
            "commit": self.commit,
            "machine": machine,
            "rows": self.rows.iter().map(|r| json!({
                "scenario": r.scenario,
                "case": r.case,
                "metric": r.metric,
                "unit": r.unit,
                "median": r.value.median,
                "min": r.value.min,
                "max": r.value.max,
                "n": r.value.n,
                "target": r.target,
                "met": r.met,
                "detail": r.detail,
                "machine": machine,
            })).collect::<Vec<_>>(),
            "failures": self.failures.iter().map(|f| json!({
                "scenario": f.scenario,
                "error": f.what,
            })).collect::<Vec<_>>(),
            "notes": self.notes,
        })
    }

    /// `bench-<unix time>.{md,json}` plus `latest.{md,json}` in `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let md = self.markdown();
        let json = serde_json::to_string_pretty(&self.json())?;
        let stamp = unix_seconds(self.started);
        for name in [format!("bench-{stamp}"), "latest".to_owned()] {
            fs::write(dir.join(format!("{name}.md")), &md)?;
            fs::write(dir.join(format!("{name}.json")), &json)?;
        }
        Ok(())
    }
}
