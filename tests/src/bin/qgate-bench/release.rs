//! Scenario 4: a statement held for review, approved through the API after
//! 1, 10 and 60 s. Measured on one clock, in this process: from the moment
//! the approve call's answer is in to the moment the statement's
//! CommandComplete reaches the client. Beside it, what the client would have
//! waited without re-injection: the time left until its TCP's next
//! retransmission of the held segment (TCP_INFO at the moment of approval).
use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use qgate_e2e::{agent_bin, output_within, Lab, PG_PORT};

use crate::{
    bench_lab::{self, agent_log_tail},
    report::{Failure, Row},
    stats::Spread,
    wire::{http, PgSession},
    Budget, Outcome, Settings,
};

/// Holds UPDATEs of `bench_hold` for one approval from `reviewers`, allows
/// the rest.
const HOLD_POLICY: &str = r#"[default]
action = "allow"

[[rules]]
name = "bench-hold"
tables = ["bench_hold"]
verbs = ["UPDATE"]
action = "hold"
reviewers = ["reviewers"]
"#;

const STATEMENT: &str = "UPDATE bench_hold SET n = n + 1 WHERE id = 1";

/// (hold length, repetitions)
fn plan(s: &Settings) -> Vec<(u64, usize)> {
    if s.quick {
        vec![(1, 1)]
    } else {
        vec![(1, 3), (10, 2), (60, 1)]
    }
}

pub fn budget(s: &Settings) -> Duration {
    let holds: u64 = plan(s).iter().map(|(h, n)| (h + 20) * *n as u64).sum();
    Duration::from_secs(90 + holds)
}

pub fn run(s: &Settings, budget: Budget) -> Result<Outcome> {
    let mut out = Outcome::default();
    let mut lab = Lab::new("benchrel")?;
    lab.start_postgres()?;
    bench_lab::sql(
        &lab,
        "CREATE TABLE bench_hold (id int PRIMARY KEY, n int NOT NULL)",
        &budget,
    )?;
    bench_lab::sql(&lab, "INSERT INTO bench_hold VALUES (1, 0)", &budget)?;
    let policy = lab.dir.join("hold.toml");
    std::fs::write(&policy, HOLD_POLICY)?;
    let token = reviewer_token(&lab, &budget)?;
    lab.start_agent(&["--policy", &policy.display().to_string()])?;
    for (hold, reps) in plan(s) {
        let mut release_ms = Vec::new();
        let mut retransmit_ms = Vec::new();
        let mut approve_ms = Vec::new();
        for rep in 0..reps {
            match held_and_approved(&lab, &token, Duration::from_secs(hold), &budget) {
                Ok(m) => {
                    release_ms.push(m.release_ms);
                    retransmit_ms.push(m.next_retransmit_ms);
                    approve_ms.push(m.approve_call_ms);
                }
                Err(e) => {
                    out.failures.push(Failure {
                        scenario: 4,
                        what: format!(
                            "{hold} s hold, repetition {}: {e:#}\nagent log tail:\n{}",
                            rep + 1,
                            agent_log_tail(&lab)
                        ),
                    });
                    let _ = lab.stop_agent();
                    return Ok(out);
                }
            }
        }
        let (Some(release), Some(retransmit), Some(approve)) = (
            Spread::of(&release_ms),
            Spread::of(&retransmit_ms),
            Spread::of(&approve_ms),
        ) else {
            continue;
        };
        out.rows.push(Row {
            scenario: 4,
            case: format!("held {hold} s, approved through the API"),
            metric: "approve answer → CommandComplete".into(),
            unit: "ms",
            value: release,
            target: Some("< 1000 ms".into()),
            met: Some(release.max < 1000.0),
            detail: format!(
                "approve call took {:.1} ms; waiting for the client's next retransmission would have taken {:.0} ms [{:.0} – {:.0}]",
                approve.median, retransmit.median, retransmit.min, retransmit.max
            ),
        });
    }
    lab.stop_agent()?;
    Ok(out)
}

struct Measured {
    release_ms: f64,
    next_retransmit_ms: f64,
    approve_call_ms: f64,
}

fn reviewer_token(lab: &Lab, budget: &Budget) -> Result<String> {
    let out = output_within(
        Command::new(agent_bin())
            .args([
                "reviewers",
                "add",
                "bench-reviewer",
                "--groups",
                "reviewers",
                "--db",
            ])
            .arg(lab.db_path())
            .arg("--json"),
        budget.at_most(Duration::from_secs(30))?,
    )?;
    if !out.status.success() {
        bail!(
            "qgate-agent reviewers add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let value: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("reviewers add --json output")?;
    value["token"]
        .as_str()
        .map(str::to_owned)
        .context("no token in `reviewers add --json` output")
}

fn held_and_approved(lab: &Lab, token: &str, hold: Duration, budget: &Budget) -> Result<Measured> {
    let server = (lab.server_ip, PG_PORT).into();
    let stream = lab.connect_from_client(server, Duration::from_secs(5))?;
    let mut session = PgSession::start(stream, "postgres", "postgres", Duration::from_secs(10))?;
    let sent = Instant::now();
    session.send_query(STATEMENT)?;
    let request = pending_request(lab, token, budget)?;
    let approve_at = sent + hold;
    thread::sleep(approve_at.saturating_duration_since(Instant::now()));
    let (next_retransmit_ms, _) = session.next_retransmission()?;
    // The reader waits on its own thread so the CommandComplete is stamped
    // the moment it arrives, even before the approve call has returned.
    let wait = budget.at_most(Duration::from_secs(30))?;
    let reader = thread::spawn(move || session.complete(wait));
    let api = (std::net::Ipv4Addr::LOCALHOST, lab.api_port()).into();
    let call = Instant::now();
    let answer = http(
        lab.connect_in_server(api, Duration::from_secs(5))?,
        "POST",
        &format!("/v1/requests/{request}/approve"),
        token,
        Duration::from_secs(30),
    )?;
    if answer.status != 200 {
        bail!("approve answered {}: {}", answer.status, answer.body);
    }
    let (tag, completed) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
        .context("the approved statement did not complete")?;
    if tag != "UPDATE 1" {
        bail!("the approved statement completed as {tag:?}, not UPDATE 1");
    }
    let signed_ms = |a: Instant, b: Instant| match b.checked_duration_since(a) {
        Some(d) => d.as_secs_f64() * 1e3,
        None => -(a.duration_since(b).as_secs_f64() * 1e3),
    };
    Ok(Measured {
        release_ms: signed_ms(answer.at, completed),
        next_retransmit_ms,
        approve_call_ms: signed_ms(call, answer.at),
    })
}

/// The id of the pending request for [`STATEMENT`], once the agent has filed it.
fn pending_request(lab: &Lab, token: &str, budget: &Budget) -> Result<i64> {
    let api = (std::net::Ipv4Addr::LOCALHOST, lab.api_port()).into();
    lab.wait_for(
        "the held UPDATE as a pending request",
        budget.at_most(Duration::from_secs(15))?,
        || {
            let answer = http(
                lab.connect_in_server(api, Duration::from_secs(5))?,
                "GET",
                "/v1/requests?status=pending",
                token,
                Duration::from_secs(10),
            )?;
            if answer.status != 200 {
                bail!(
                    "GET /v1/requests answered {}: {}",
                    answer.status,
                    answer.body
                );
            }
            let list: serde_json::Value = serde_json::from_str(&answer.body)?;
            Ok(list.as_array().and_then(|items| {
                items
                    .iter()
                    .find(|r| {
                        r["statement"]
                            .as_str()
                            .is_some_and(|s| s.contains("bench_hold"))
                    })
                    .and_then(|r| r["id"].as_i64())
            }))
        },
    )
}
