//! Scenario 3: statements the kernel sends up for a decision and the policy
//! then allows. The same UPDATE script through qgate in monitor mode (never
//! held) and under a policy that allows everything (the kernel holds each
//! UPDATE until the agent has decided and re-injected it): the difference
//! is what a gated-but-allowed statement costs.
use std::{fs, time::Duration};

use anyhow::Result;

use crate::{
    bench_lab::{self, agent_log_tail, Target},
    report::{Failure, Row},
    stats::Spread,
    Budget, Outcome, Settings,
};

/// Allows every UPDATE. The one rule that can hold (DDL) makes the kernel
/// gate the connection (`gate-risky`): every statement that is not a plain
/// read, so every UPDATE, is sent to the agent and decided there. (A policy
/// that can hold nothing puts connections in monitor mode instead.)
const ALLOW_ALL: &str = "[default]\naction = \"allow\"\n\n\
[[rules]]\nname = \"ddl\"\nkinds = [\"ddl\"]\naction = \"hold\"\nreviewers = [\"reviewers\"]\n";

/// One autocommit UPDATE per transaction: transaction latency is statement latency.
const SCRIPT: &str = "\\set aid random(1, 100000)\n\
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n";

pub fn budget(s: &Settings) -> Duration {
    Duration::from_secs(90 + 2 * s.pairs as u64 * (u64::from(s.seconds) + 10))
}

pub fn run(s: &Settings, budget: Budget) -> Result<Outcome> {
    let mut out = Outcome::default();
    let mut lab = bench_lab::lab_with_pgbench("benchgat", &budget)?;
    let policy = lab.dir.join("allow-all.toml");
    let script = lab.dir.join("update.sql");
    fs::write(&policy, ALLOW_ALL)?;
    fs::write(&script, SCRIPT)?;
    let policy = policy.display().to_string();
    let script = script.display().to_string();
    let log_dir = lab.dir.join("pgbench-log");
    let mut monitor = Vec::new();
    let mut gated = Vec::new();
    for pair in 0..s.pairs {
        for gate in [false, true] {
            let args: Vec<&str> = if gate {
                vec!["--policy", &policy]
            } else {
                vec!["--monitor"]
            };
            lab.start_agent(&args)?;
            let run = bench_lab::pgbench(
                &lab,
                Target::postgres(&lab),
                &["-f", &script, "-c", "1"],
                s.seconds,
                &log_dir,
                &budget,
            );
            let tail = agent_log_tail(&lab);
            let _ = lab.stop_agent();
            match run {
                Ok(r) if gate => gated.push(r),
                Ok(r) => monitor.push(r),
                Err(e) => {
                    out.failures.push(Failure {
                        scenario: 3,
                        what: format!(
                            "{} leg, pair {}: {e:#}\nagent log tail:\n{tail}",
                            if gate { "gated" } else { "monitor" },
                            pair + 1
                        ),
                    });
                    return Ok(out);
                }
            }
        }
        println!("   pair {}/{} done", pair + 1, s.pairs);
    }
    let pairs: Vec<_> = monitor.iter().zip(&gated).collect();
    let med = |f: &dyn Fn(&crate::stats::PgbenchRun) -> f64, runs: &[crate::stats::PgbenchRun]| {
        Spread::of(&runs.iter().map(f).collect::<Vec<_>>()).map_or(f64::NAN, |s| s.median)
    };
    let detail = format!(
        "monitor: p50 {:.0} µs, p99 {:.0} µs, {:.0} tps; gated: p50 {:.0} µs, p99 {:.0} µs, {:.0} tps (1 client)",
        med(&|r| r.p50(), &monitor),
        med(&|r| r.p99(), &monitor),
        med(&|r| r.tps, &monitor),
        med(&|r| r.p50(), &gated),
        med(&|r| r.p99(), &gated),
        med(&|r| r.tps, &gated),
    );
    for (metric, p, target) in [
        ("added p50 latency per gated UPDATE", 50.0, Some(1000.0)),
        ("added p99 latency per gated UPDATE", 99.0, None),
    ] {
        let diffs: Vec<f64> = pairs
            .iter()
            .map(|(m, g)| {
                crate::stats::percentile(&g.latencies_us, p)
                    - crate::stats::percentile(&m.latencies_us, p)
            })
            .collect();
        if let Some(v) = Spread::of(&diffs) {
            out.rows.push(Row {
                scenario: 3,
                case: "UPDATE allowed by policy after a kernel hold − monitor mode".into(),
                metric: metric.into(),
                unit: "µs",
                value: v,
                target: target.map(|t| format!("< {t:.0} µs")),
                met: target.map(|t| v.median < t),
                detail: detail.clone(),
            });
        }
    }
    Ok(out)
}
