//! Scenario 5: the highest statement rate at which the agent still records
//! every statement. `pgbench -S` with ever more clients against qgate in
//! monitor mode; after each step the store must hold exactly as many of
//! pgbench's SELECTs as pgbench completed, and the kernel's and writer's
//! loss counters must read zero. Stops at the first loss or when more
//! clients no longer raise the rate (the server is saturated).
use std::time::Duration;

use anyhow::Result;
use qgate_e2e::Lab;

use crate::{
    bench_lab::{self, agent_log_tail, Target},
    report::{Failure, Row},
    stats::Spread,
    Budget, Outcome, Settings,
};

fn steps(s: &Settings) -> Vec<u32> {
    if s.quick {
        vec![8, 32]
    } else {
        vec![4, 8, 16, 32, 64]
    }
}

pub fn budget(s: &Settings) -> Duration {
    Duration::from_secs(90 + steps(s).len() as u64 * (u64::from(s.seconds) + 40))
}

/// pgbench -S's statement, as stored.
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
        "SELECT coalesce(max(ringbuf_full + truncated + load_errors + writer_dropped), 0) FROM capture_loss",
        [],
        |r| r.get(0),
    )?)
}

struct Step {
    clients: u32,
    rate: f64,
    sent: i64,
    stored: i64,
    loss: i64,
}

pub fn run(s: &Settings, budget: Budget) -> Result<Outcome> {
    let mut out = Outcome::default();
    let mut lab = bench_lab::lab_with_pgbench("benchcap", &budget)?;
    lab.start_agent(&["--monitor"])?;
    let log_dir = lab.dir.join("pgbench-log");
    let mut done: Vec<Step> = Vec::new();
    let mut stored_before = 0;
    for c in steps(s) {
        let cs = c.to_string();
        let run = match bench_lab::pgbench(
            &lab,
            Target::postgres(&lab),
            &["-S", "-c", &cs, "-j", &bench_lab::threads(c)],
            s.seconds,
            &log_dir,
            &budget,
        ) {
            Ok(r) => r,
            Err(e) => {
                out.failures.push(Failure {
                    scenario: 5,
                    what: format!("{c} clients: {e:#}\n{}", agent_log_tail(&lab)),
                });
                break;
            }
        };
        let sent = run.processed as i64;
        // The writer batches: give it a moment to catch up before counting.
        let settled = lab.wait_for(
            "the store to catch up",
            budget.at_most(Duration::from_secs(20))?,
            || Ok((stored_selects(&lab)? - stored_before >= sent).then_some(())),
        );
        let stored = stored_selects(&lab)? - stored_before;
        stored_before += stored;
        // Counters reach the store on the agent's next heartbeat.
        std::thread::sleep(Duration::from_millis(600));
        let loss = loss_counter(&lab)?;
        let step = Step {
            clients: c,
            rate: run.tps,
            sent,
            stored,
            loss,
        };
        println!(
            "   {c} clients: {:.0} statements/s, sent {sent}, stored {stored}, loss counter {loss}",
            run.tps
        );
        let lossy = settled.is_err() || stored < sent || loss > 0;
        let saturated = done.iter().map(|d| d.rate).fold(0.0, f64::max) * 1.05 > step.rate;
        done.push(step);
        if lossy || saturated {
            break;
        }
    }
    lab.stop_agent()?;
    let lossless: Vec<&Step> = done
        .iter()
        .filter(|d| d.stored >= d.sent && d.loss == 0)
        .collect();
    let last = done.last();
    let why = match last {
        Some(l) if l.stored < l.sent || l.loss > 0 => format!(
            "loss appeared at {} clients: {} of {} statements stored, loss counter {}",
            l.clients, l.stored, l.sent, l.loss
        ),
        Some(l) => format!(
            "no loss; the server saturated at {} clients (more clients did not raise the rate); last step: {} of {} stored, loss counter {}",
            l.clients, l.stored, l.sent, l.loss
        ),
        None => "no step completed".into(),
    };
    if let Some(best) = lossless.iter().max_by(|a, b| a.rate.total_cmp(&b.rate)) {
        let value = Spread {
            median: best.rate,
            min: best.rate,
            max: best.rate,
            n: 1,
        };
        out.rows.push(Row {
            scenario: 5,
            case: format!("pgbench -S, qgate monitor, {} clients", best.clients),
            metric: "max statement rate with zero loss".into(),
            unit: "statements/s",
            value,
            target: None,
            met: None,
            detail: why.clone(),
        });
    }
    if let Some(l) = last {
        out.rows.push(Row {
            scenario: 5,
            case: format!(
                "pgbench -S, qgate monitor, {} clients (last step)",
                l.clients
            ),
            metric: "loss counter".into(),
            unit: "events",
            value: Spread {
                median: l.loss as f64,
                min: l.loss as f64,
                max: l.loss as f64,
                n: 1,
            },
            target: Some("0".into()),
            met: Some(l.loss == 0 && l.stored >= l.sent),
            detail: why,
        });
    }
    Ok(out)
}
