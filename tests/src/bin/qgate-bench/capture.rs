//! Scenario 5: the highest statement rate at which the agent still records
//! every statement. pgbench with ever more clients against qgate in monitor
//! mode, two ways: `-S` (simple protocol, one statement per round trip) and
//! a pipelined script (extended protocol, [`PIPELINE`] statements per round
//! trip, far more statements per second for the same server work). After
//! each step the store must hold exactly as many of pgbench's SELECTs as
//! pgbench completed, and the kernel's and writer's loss counters must read
//! zero. A ladder stops at the first loss or when more clients no longer
//! raise the rate (the server is saturated).
use std::{
    fs, thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use qgate_e2e::Lab;

use crate::{
    bench_lab::{self, agent_log_tail, Target},
    report::{Failure, Row},
    stats::Spread,
    Budget, Outcome, Settings,
};

/// Statements per pipelined transaction.
const PIPELINE: usize = 10;

fn steps(s: &Settings) -> Vec<u32> {
    if s.quick {
        vec![1, 8, 32]
    } else {
        vec![1, 2, 4, 8, 16, 32, 64]
    }
}

pub fn budget(s: &Settings) -> Duration {
    Duration::from_secs(90 + 2 * steps(s).len() as u64 * (u64::from(s.seconds) + 40))
}

/// pgbench's SELECT as stored, literal or `$1`.
const SELECT_LIKE: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = %";

fn stored_selects(lab: &Lab) -> Result<i64> {
    Ok(lab.store()?.query_row(
        "SELECT count(*) FROM statements WHERE text LIKE ?1 AND completed_at IS NOT NULL",
        [SELECT_LIKE],
        |r| r.get(0),
    )?)
}

fn loss_counter(lab: &Lab) -> Result<i64> {
    Ok(lab.store()?.query_row(
        "SELECT coalesce((SELECT ringbuf_full + truncated + load_errors + writer_dropped + hook_lost
                          FROM capture_loss ORDER BY id DESC LIMIT 1), 0)",
        [],
        |r| r.get(0),
    )?)
}

struct Ladder {
    name: &'static str,
    args: Vec<String>,
    statements_per_transaction: usize,
}

struct Step {
    clients: u32,
    /// Statements per second.
    rate: f64,
    sent: i64,
    stored: i64,
    loss: i64,
}

impl Step {
    fn lossless(&self) -> bool {
        self.stored >= self.sent && self.loss == 0
    }
}

pub fn run(s: &Settings, budget: Budget) -> Result<Outcome> {
    let mut out = Outcome::default();
    let mut lab = bench_lab::lab_with_pgbench("benchcap", &budget)?;
    let script = lab.dir.join("pipeline.sql");
    let mut text = "\\set aid random(1, 100000)\n\\startpipeline\n".to_owned();
    for _ in 0..PIPELINE {
        text.push_str("SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n");
    }
    text.push_str("\\endpipeline\n");
    fs::write(&script, text)?;
    let ladders = [
        Ladder {
            name: "pgbench -S (simple protocol, 1 statement per round trip)",
            args: vec!["-S".into()],
            statements_per_transaction: 1,
        },
        Ladder {
            name: "pgbench pipeline (extended protocol, 10 statements per round trip)",
            args: vec![
                "-M".into(),
                "extended".into(),
                "-f".into(),
                script.display().to_string(),
            ],
            statements_per_transaction: PIPELINE,
        },
    ];
    let mut stored_before = 0;
    for ladder in &ladders {
        let steps = climb(s, &budget, &mut lab, ladder, &mut stored_before, &mut out);
        report(ladder, &steps, &mut out);
    }
    Ok(out)
}

fn climb(
    s: &Settings,
    budget: &Budget,
    lab: &mut Lab,
    ladder: &Ladder,
    stored_before: &mut i64,
    out: &mut Outcome,
) -> Vec<Step> {
    let log_dir = lab.dir.join("pgbench-log");
    let mut done: Vec<Step> = Vec::new();
    for c in steps(s) {
        match step(s, budget, lab, ladder, c, &log_dir, stored_before) {
            Ok(step) => {
                println!(
                    "   {}, {c} clients: {:.0} statements/s, sent {}, stored {}, loss counter {}",
                    ladder.args.join(" "),
                    step.rate,
                    step.sent,
                    step.stored,
                    step.loss
                );
                let best = done.iter().map(|d| d.rate).fold(0.0, f64::max);
                let stop = !step.lossless() || best * 1.05 > step.rate;
                done.push(step);
                if stop {
                    break;
                }
            }
            Err(e) => {
                out.failures.push(Failure {
                    scenario: 5,
                    what: format!(
                        "{} at {c} clients: {e:#}\n{}",
                        ladder.name,
                        agent_log_tail(lab)
                    ),
                });
                break;
            }
        }
    }
    done
}

fn step(
    s: &Settings,
    budget: &Budget,
    lab: &mut Lab,
    ladder: &Ladder,
    clients: u32,
    log_dir: &std::path::Path,
    stored_before: &mut i64,
) -> Result<Step> {
    let c = clients.to_string();
    let j = bench_lab::threads(clients);
    let mut args: Vec<&str> = ladder.args.iter().map(String::as_str).collect();
    args.extend(["-c", &c, "-j", &j]);
    // A fresh agent per step: it records its final loss counters (the
    // writer's drops included) in the store when it stops.
    lab.start_agent(&["--monitor"])?;
    let run = match bench_lab::pgbench(
        lab,
        Target::postgres(lab),
        &args,
        s.seconds,
        log_dir,
        budget,
    ) {
        Ok(run) => run,
        Err(e) => {
            let _ = lab.stop_agent();
            return Err(e);
        }
    };
    let per = ladder.statements_per_transaction as i64;
    let sent = run.processed as i64 * per;
    settle(lab, budget, *stored_before + sent)?;
    // Count after the agent has stopped: it drains its rings and records its
    // final loss counters (a ring that overflowed is counted there) on the
    // way out. Read before, the counter was the previous agent's.
    lab.stop_agent()?;
    let stored = stored_selects(lab)? - *stored_before;
    *stored_before += stored;
    Ok(Step {
        clients,
        rate: run.tps * per as f64,
        sent,
        stored,
        loss: loss_counter(lab)?,
    })
}

/// Waits until the store holds `expected` SELECTs, or until its count has
/// stopped rising for [`QUIET`] (the agent drains the ring buffer and the
/// writer batches, so the last statements land a little after pgbench ends).
fn settle(lab: &Lab, budget: &Budget, expected: i64) -> Result<()> {
    const QUIET: Duration = Duration::from_secs(3);
    let deadline = Instant::now() + budget.at_most(Duration::from_secs(90))?;
    let (mut last, mut since) = (stored_selects(lab)?, Instant::now());
    while Instant::now() < deadline {
        let now = stored_selects(lab)?;
        if now >= expected {
            return Ok(());
        }
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= QUIET {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn report(ladder: &Ladder, done: &[Step], out: &mut Outcome) {
    let Some(last) = done.last() else { return };
    for silent in done.iter().filter(|d| d.stored < d.sent && d.loss == 0) {
        out.failures.push(Failure {
            scenario: 5,
            what: format!(
                "{} at {} clients: {} statements neither stored nor counted as lost (a silent gap)",
                ladder.name,
                silent.clients,
                silent.sent - silent.stored
            ),
        });
    }
    let why = if last.lossless() {
        format!(
            "no loss; stopped at {} clients (more clients no longer raised the rate, or the last step): {} of {} stored, loss counter {}",
            last.clients, last.stored, last.sent, last.loss
        )
    } else {
        format!(
            "loss appeared at {} clients: {} of {} statements stored, loss counter {}",
            last.clients, last.stored, last.sent, last.loss
        )
    };
    let one = |v: f64| Spread {
        median: v,
        min: v,
        max: v,
        n: 1,
    };
    if let Some(best) = done
        .iter()
        .filter(|d| d.lossless())
        .max_by(|a, b| a.rate.total_cmp(&b.rate))
    {
        out.rows.push(Row {
            scenario: 5,
            case: format!("{}, qgate monitor, {} clients", ladder.name, best.clients),
            metric: "max statement rate with zero loss".into(),
            unit: "statements/s",
            value: one(best.rate),
            target: None,
            met: None,
            detail: why.clone(),
        });
    }
    out.rows.push(Row {
        scenario: 5,
        case: format!(
            "{}, qgate monitor, {} clients (last step)",
            ladder.name, last.clients
        ),
        metric: "loss counter".into(),
        unit: "events",
        value: one(last.loss as f64),
        target: Some("0".into()),
        met: Some(last.lossless()),
        detail: why,
    });
}
