//! `qgate-bench`: qgate against a direct connection and against proxies, in
//! one run, over the end-to-end harness (PostgreSQL in one namespace,
//! pgbench in another, veth between). Every figure is a ratio or a
//! difference against a baseline measured in the same run, runs alternated
//! (A B A B …), median and range over the pairs.
//!
//! `cargo xtask bench [--quick] [-- --only 1,2,7]` builds everything in
//! release and runs this; the table and JSON land in `target/bench/`.
//! Nothing here fails on speed: a missed target is a "no" in the table. A
//! scenario that cannot finish (a hang, a crash) is reported as not
//! measured and makes the exit status non-zero.
use std::{
    path::PathBuf,
    process::ExitCode,
    sync::mpsc,
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use qgate_e2e::require_root;

mod bench_lab;
mod bpf_cost;
mod capture;
mod classifier;
mod gated;
mod hook;
mod release;
mod report;
mod stats;
mod throughput;
mod wire;

use report::{Failure, Machine, Report, Row};

const USAGE: &str = "qgate-bench [--quick] [--only 1,2,...] [--pairs N] [--seconds N] [--out DIR]

Scenarios: 1 ungated overhead, 2 proxy peer, 3 gated but allowed,
4 release latency, 5 capture completeness, 6 classifier, 7 agent footprint,
8 server hook cost.
Needs root; QGATE_AGENT_BIN names a release build of qgate-agent.";

/// What a run measures and for how long.
#[derive(Debug, Clone)]
pub struct Settings {
    pub quick: bool,
    pub only: Vec<u8>,
    /// Alternated pairs per comparison.
    pub pairs: usize,
    /// Length of one pgbench run.
    pub seconds: u32,
    /// Client counts of scenarios 1 and 2.
    pub clients: Vec<u32>,
    pub workspace: PathBuf,
    pub out: PathBuf,
}

impl Settings {
    fn parse(args: &[String]) -> Result<Settings> {
        let workspace = std::env::var_os("QGATE_WORKSPACE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."));
        let quick = args.iter().any(|a| a == "--quick");
        let mut s = Settings {
            quick,
            only: (1..=8).collect(),
            pairs: if quick { 2 } else { 5 },
            seconds: if quick { 3 } else { 10 },
            clients: if quick { vec![8] } else { vec![1, 8, 32] },
            out: workspace.join("target/bench"),
            workspace,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
            match arg.as_str() {
                "--quick" => {}
                "--only" => {
                    s.only = value("--only")?
                        .split(',')
                        .map(|n| match n.trim().parse::<u8>() {
                            Ok(n @ 1..=8) => Ok(n),
                            _ => bail!("--only takes scenario numbers 1 to 8, got {n:?}"),
                        })
                        .collect::<Result<_>>()?;
                }
                "--pairs" => s.pairs = value("--pairs")?.parse().context("--pairs")?,
                "--seconds" => s.seconds = value("--seconds")?.parse().context("--seconds")?,
                "--out" => s.out = PathBuf::from(value("--out")?),
                "-h" | "--help" => bail!("{USAGE}"),
                other => bail!("unknown argument {other:?}\n\n{USAGE}"),
            }
        }
        if s.pairs == 0 || s.seconds == 0 {
            bail!("--pairs and --seconds must be at least 1");
        }
        Ok(s)
    }

    pub fn wants(&self, scenario: u8) -> bool {
        self.only.contains(&scenario)
    }
}

/// Time left for one scenario: every wait inside it is bounded by this, so
/// a hang ends as a reported failure.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    deadline: Instant,
}

impl Budget {
    pub fn new(total: Duration) -> Budget {
        Budget {
            deadline: Instant::now() + total,
        }
    }

    /// The time left, or an error once it is spent.
    pub fn left(&self) -> Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("the scenario's time budget is spent");
        }
        Ok(left)
    }

    /// `want`, or less when less is left.
    pub fn at_most(&self, want: Duration) -> Result<Duration> {
        Ok(self.left()?.min(want))
    }
}

/// What one scenario group produced: rows, legs that failed, remarks.
#[derive(Default)]
pub struct Outcome {
    pub rows: Vec<Row>,
    pub failures: Vec<Failure>,
    pub notes: Vec<String>,
}

type Job = fn(&Settings, Budget) -> Result<Outcome>;

/// One group of scenarios run in one lab: which numbers it covers, how long
/// it may take, and the function.
struct Group {
    scenarios: &'static [u8],
    name: &'static str,
    budget: fn(&Settings) -> Duration,
    job: Job,
}

const GROUPS: &[Group] = &[
    Group {
        scenarios: &[1, 2, 7],
        name: "throughput: direct, qgate, proxies",
        budget: throughput::budget,
        job: throughput::run,
    },
    Group {
        scenarios: &[3],
        name: "gated but allowed",
        budget: gated::budget,
        job: gated::run,
    },
    Group {
        scenarios: &[4],
        name: "release latency",
        budget: release::budget,
        job: release::run,
    },
    Group {
        scenarios: &[5],
        name: "capture completeness",
        budget: capture::budget,
        job: capture::run,
    },
    Group {
        scenarios: &[6],
        name: "classifier",
        budget: classifier::budget,
        job: classifier::run,
    },
    Group {
        scenarios: &[8],
        name: "server hook cost",
        budget: hook::budget,
        job: hook::run,
    },
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let settings = match Settings::parse(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("qgate-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    require_root();
    let started = SystemTime::now();
    let mut report = Report {
        machine: Machine::this(),
        quick: settings.quick,
        commit: commit(&settings),
        started,
        rows: Vec::new(),
        failures: Vec::new(),
        notes: Vec::new(),
    };
    println!("qgate-bench on {}", report.machine.short());
    for group in GROUPS {
        let first = match group.scenarios.iter().find(|n| settings.wants(**n)) {
            Some(n) => *n,
            None => continue,
        };
        let budget = (group.budget)(&settings);
        println!(
            "== {} (scenarios {:?}, at most {} s)",
            group.name,
            group.scenarios,
            budget.as_secs()
        );
        let began = Instant::now();
        match run_group(group.job, &settings, budget) {
            Ok(outcome) => {
                for r in &outcome.rows {
                    println!(
                        "   {}. {} — {}: {:.3} [{:.3} – {:.3}] {}",
                        r.scenario,
                        r.case,
                        r.metric,
                        r.value.median,
                        r.value.min,
                        r.value.max,
                        r.unit
                    );
                }
                for f in &outcome.failures {
                    println!("   {}. NOT MEASURED: {}", f.scenario, f.what);
                }
                report.rows.extend(outcome.rows);
                report.failures.extend(outcome.failures);
                report.notes.extend(outcome.notes);
            }
            Err(e) => {
                println!("   NOT MEASURED: {e:#}");
                report.failures.push(Failure {
                    scenario: first,
                    what: format!("{} failed: {e:#}", group.name),
                });
            }
        }
        println!("   ({} s)", began.elapsed().as_secs());
    }
    report.rows.retain(|r| settings.wants(r.scenario));
    println!("\n{}", report.markdown());
    if let Err(e) = report.write(&settings.out) {
        eprintln!("qgate-bench: writing the report: {e:#}");
        return ExitCode::FAILURE;
    }
    println!("written to {}/latest.{{md,json}}", settings.out.display());
    if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs `job` on its own thread and gives up on it a minute after its
/// budget: the job bounds every wait itself, this is the last resort.
fn run_group(job: Job, settings: &Settings, budget: Duration) -> Result<Outcome> {
    let (tx, rx) = mpsc::channel();
    let s = settings.clone();
    thread::spawn(move || {
        let _ = tx.send(job(&s, Budget::new(budget)));
    });
    match rx.recv_timeout(budget + Duration::from_secs(60)) {
        Ok(result) => result,
        Err(_) => bail!("still running {} s after its budget; abandoned", 60),
    }
}

fn commit(settings: &Settings) -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(&settings.workspace)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}
