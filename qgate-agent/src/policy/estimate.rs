//! Row and cost estimates for `estimated_rows_above` and
//! `estimated_cost_above`: the planner's own guess, asked over the agent's
//! separate read-only connection (one EXPLAIN answers both).
//!
//! The statement is never executed: it is sent as `EXPLAIN (FORMAT JSON) …`
//! without ANALYZE, over the extended protocol (which refuses several
//! commands in one string), inside a READ ONLY transaction that is rolled
//! back, with a statement timeout. Strings that are not exactly one plannable
//! statement are refused before anything is sent.
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::RowEstimator;
use crate::classify::{classify, Dialect, Flag, Kind, StatementFacts};

/// Where the agent's read-only estimator connects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EstimatorConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    #[serde(default)]
    pub password: Option<String>,
}

impl EstimatorConfig {
    /// Reads a libpq-style `key=value` string (`host`, `port`, `user`,
    /// `dbname`, `password`); missing keys default to localhost:5432 and the
    /// user `qgate`.
    pub fn from_conninfo(conninfo: &str) -> Result<EstimatorConfig, EstimateError> {
        let mut config = EstimatorConfig {
            host: "127.0.0.1".into(),
            port: 5432,
            user: "qgate".into(),
            dbname: String::new(),
            password: None,
        };
        for pair in conninfo.split_whitespace() {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| EstimateError::Refused(format!("`{pair}` is not key=value")))?;
            match key {
                "host" => config.host = value.to_owned(),
                "port" => {
                    config.port = value.parse().map_err(|_| {
                        EstimateError::Refused(format!("port `{value}` is not a number"))
                    })?
                }
                "user" => config.user = value.to_owned(),
                "dbname" => config.dbname = value.to_owned(),
                "password" => config.password = Some(value.to_owned()),
                other => {
                    return Err(EstimateError::Refused(format!(
                        "unknown connection key `{other}` (host, port, user, dbname, password)"
                    )))
                }
            }
        }
        if config.dbname.is_empty() {
            config.dbname = config.user.clone();
        }
        Ok(config)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EstimateError {
    #[error("not estimated: {0}")]
    Refused(String),
    #[error("cannot connect to the estimator database: {0}")]
    Connect(String),
    #[error("EXPLAIN failed: {0}")]
    Explain(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("unexpected EXPLAIN output: {0}")]
    BadPlan(String),
}

/// Checks that `statement` is one statement EXPLAIN can plan.
pub(crate) fn plannable(statement: &str) -> Result<(), EstimateError> {
    let c = classify(statement, Dialect::Postgresql);
    let [only] = c.statements.as_slice() else {
        return Err(EstimateError::Refused(format!(
            "{} statements in one string",
            c.statements.len()
        )));
    };
    let first = only.verb.split(' ').next().unwrap_or("");
    let explainable = matches!(only.kind, Kind::Read | Kind::Write)
        && matches!(
            first,
            "SELECT" | "VALUES" | "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "TABLE"
        )
        && !only.has(Flag::Prepared)
        && !only.has(Flag::ExplainAnalyze);
    if explainable {
        Ok(())
    } else {
        Err(EstimateError::Refused(format!(
            "a {} statement ({}) cannot be planned by EXPLAIN",
            only.kind,
            if only.verb.is_empty() {
                "?"
            } else {
                &only.verb
            }
        )))
    }
}

/// What the planner says of a statement.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// See [`rows_from_plan`].
    pub rows: u64,
    /// The top plan's `Total Cost`.
    pub cost: f64,
}

/// Runs `EXPLAIN (FORMAT JSON) statement` and returns the planner's row
/// estimate (see [`rows_from_plan`]). Gives up after `timeout`.
pub fn explain_rows(
    config: &EstimatorConfig,
    statement: &str,
    timeout: Duration,
) -> Result<u64, EstimateError> {
    explain(config, statement, timeout).map(|e| e.rows)
}

/// Runs `EXPLAIN (FORMAT JSON) statement`: its rows and total cost. Gives
/// up after `timeout`.
pub fn explain(
    config: &EstimatorConfig,
    statement: &str,
    timeout: Duration,
) -> Result<Estimate, EstimateError> {
    plannable(statement)?;
    let (reply, answer) = mpsc::channel();
    let config = config.clone();
    let statement = statement.to_owned();
    // The postgres client blocks (and runs its own runtime), so it gets a
    // thread of its own; a server that stops answering costs that thread, not
    // the caller's deadline.
    std::thread::Builder::new()
        .name("qgate-estimate".into())
        .spawn(move || {
            let _ = reply.send(explain_blocking(&config, &statement, timeout));
        })
        .map_err(|e| EstimateError::Connect(e.to_string()))?;
    match answer.recv_timeout(timeout) {
        Ok(result) => result,
        Err(_) => Err(EstimateError::Timeout(timeout)),
    }
}

fn explain_blocking(
    config: &EstimatorConfig,
    statement: &str,
    timeout: Duration,
) -> Result<Estimate, EstimateError> {
    let mut pg = postgres::Config::new();
    pg.host(&config.host)
        .port(config.port)
        .user(&config.user)
        .dbname(&config.dbname)
        .application_name("qgate-estimator")
        .connect_timeout(timeout);
    if let Some(password) = &config.password {
        pg.password(password);
    }
    let mut client = pg
        .connect(postgres::NoTls)
        .map_err(|e| EstimateError::Connect(describe(&e)))?;
    let mut tx = client
        .build_transaction()
        .read_only(true)
        .start()
        .map_err(|e| EstimateError::Explain(describe(&e)))?;
    let millis = timeout.as_millis().clamp(1, i32::MAX as u128);
    tx.batch_execute(&format!("SET LOCAL statement_timeout = {millis}"))
        .map_err(|e| EstimateError::Explain(describe(&e)))?;
    let row = tx
        .query_one(format!("EXPLAIN (FORMAT JSON) {statement}").as_str(), &[])
        .map_err(|e| EstimateError::Explain(describe(&e)))?;
    let plan: Value = row
        .try_get(0)
        .map_err(|e| EstimateError::BadPlan(describe(&e)))?;
    let _ = tx.rollback();
    Ok(Estimate {
        rows: rows_from_plan(&plan)?,
        cost: cost_from_plan(&plan)?,
    })
}

/// The top plan's `Total Cost`: the planner's whole estimate of the work.
pub fn cost_from_plan(explain: &Value) -> Result<f64, EstimateError> {
    explain
        .get(0)
        .and_then(|e| e.get("Plan"))
        .and_then(|p| p.get("Total Cost"))
        .and_then(Value::as_f64)
        .filter(|c| c.is_finite() && *c >= 0.0)
        .ok_or_else(|| EstimateError::BadPlan("no numeric [0].Plan.\"Total Cost\"".into()))
}

/// A client error with its cause: `postgres::Error` displays only its kind
/// ("db error", "error connecting to server"), and the operator reading a
/// denial needs the server's message or the socket error behind it.
fn describe(error: &postgres::Error) -> String {
    match std::error::Error::source(error) {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

/// The row estimate in `EXPLAIN (FORMAT JSON)` output: the top plan's
/// `Plan Rows`, or for a write the rows its ModifyTable's input produces
/// (a ModifyTable without RETURNING itself estimates 0). The largest of these
/// anywhere in the plan, so writes in CTEs count too.
pub fn rows_from_plan(explain: &Value) -> Result<u64, EstimateError> {
    let top = explain
        .get(0)
        .and_then(|e| e.get("Plan"))
        .ok_or_else(|| EstimateError::BadPlan("no [0].Plan".into()))?;
    let mut rows = plan_rows(top)?;
    let mut stack = vec![top];
    while let Some(node) = stack.pop() {
        let children = node
            .get("Plans")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if node.get("Node Type").and_then(Value::as_str) == Some("ModifyTable") {
            for child in children {
                rows = rows.max(plan_rows(child)?);
            }
        }
        stack.extend(children);
    }
    Ok(rows.ceil() as u64)
}

fn plan_rows(node: &Value) -> Result<f64, EstimateError> {
    node.get("Plan Rows")
        .and_then(Value::as_f64)
        .filter(|r| r.is_finite() && *r >= 0.0)
        .ok_or_else(|| EstimateError::BadPlan("a plan node without a numeric \"Plan Rows\"".into()))
}

/// A [`RowEstimator`] asking the database for each estimate (a new connection
/// per estimate: only rules with `estimated_rows_above` ask, and only for
/// statements that passed every other condition of such a rule).
pub struct ExplainEstimator {
    pub config: EstimatorConfig,
    pub timeout: Duration,
    /// The last statement asked and its answer: a rule with both a row and
    /// a cost limit asks once.
    pub last: std::sync::Mutex<Option<(String, Result<Estimate, String>)>>,
}

impl ExplainEstimator {
    pub fn new(config: EstimatorConfig, timeout: Duration) -> Self {
        ExplainEstimator {
            config,
            timeout,
            last: std::sync::Mutex::new(None),
        }
    }

    fn estimate(&self, sql: &str) -> Result<Estimate, String> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((asked, answer)) = last.as_ref() {
            if asked == sql {
                return answer.clone();
            }
        }
        let answer = explain(&self.config, sql, self.timeout).map_err(|e| e.to_string());
        *last = Some((sql.to_owned(), answer.clone()));
        answer
    }
}

impl RowEstimator for ExplainEstimator {
    fn estimate_rows(&self, statement: &StatementFacts) -> Result<u64, String> {
        self.estimate(&statement.sql).map(|e| e.rows)
    }

    fn estimate_cost(&self, statement: &StatementFacts) -> Result<f64, String> {
        self.estimate(&statement.sql).map(|e| e.cost)
    }
}

/// How a [`DeferredEstimator`] asks for one statement's estimate.
pub type Ask = Arc<dyn Fn(&str) -> Result<Estimate, String> + Send + Sync>;

/// What a decision meets while the planner is being asked (the rule counts
/// it as above, but [`RowEstimator::take_pending`] tells the caller to
/// decide again when the answer is in rather than act on it).
pub const ESTIMATE_PENDING: &str = "the planner's estimate is being asked";

/// Threads asking at once: an unresponsive server ties up one each until
/// the timeout, and other statements' estimates go on meanwhile.
const ASKERS: usize = 2;
/// Answers kept (by text) before the oldest are dropped.
const MAX_ANSWERS: usize = 4096;
/// An answer serves identical statements this long.
const ANSWER_FRESH: Duration = Duration::from_secs(10);

enum Asked {
    Asking {
        since: Instant,
    },
    Ready {
        answer: Result<Estimate, String>,
        at: Instant,
    },
}

/// A [`RowEstimator`] for the gate: estimates are asked on threads of their
/// own, never on the caller's. A statement whose estimate is not in yet is
/// reported pending ([`RowEstimator::take_pending`]) and stays held; when
/// the answer arrives, `generation` is bumped and `wake` called, and the
/// gate decides it again with the answer. An estimate that does not come
/// within `give_up_after` counts as no estimate (fail closed).
pub struct DeferredEstimator {
    answers: Arc<Mutex<HashMap<String, Asked>>>,
    jobs: crossbeam_channel::Sender<String>,
    pending_met: AtomicBool,
    generation: Arc<AtomicU64>,
    give_up_after: Duration,
}

impl DeferredEstimator {
    /// Starts the asking threads.
    pub fn start(
        ask: Ask,
        give_up_after: Duration,
        wake: Box<dyn Fn() + Send + Sync>,
    ) -> DeferredEstimator {
        let answers: Arc<Mutex<HashMap<String, Asked>>> = Arc::default();
        let generation = Arc::new(AtomicU64::new(0));
        let (jobs, queue) = crossbeam_channel::unbounded::<String>();
        let wake: Arc<dyn Fn() + Send + Sync> = Arc::from(wake);
        for n in 0..ASKERS {
            let (queue, ask, answers, generation, wake) = (
                queue.clone(),
                Arc::clone(&ask),
                Arc::clone(&answers),
                Arc::clone(&generation),
                Arc::clone(&wake),
            );
            let spawned = std::thread::Builder::new()
                .name(format!("qgate-estimator-{n}"))
                .spawn(move || {
                    while let Ok(sql) = queue.recv() {
                        let started = Instant::now();
                        let answer = ask(&sql);
                        ::metrics::histogram!(ESTIMATE_LATENCY)
                            .record(started.elapsed().as_secs_f64());
                        let mut answers = lock(&answers);
                        if answers.len() >= MAX_ANSWERS {
                            answers.retain(|_, a| matches!(a, Asked::Asking { .. }));
                        }
                        answers.insert(
                            sql,
                            Asked::Ready {
                                answer,
                                at: Instant::now(),
                            },
                        );
                        drop(answers);
                        generation.fetch_add(1, Ordering::AcqRel);
                        wake();
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("starting an estimator thread: {e}");
            }
        }
        DeferredEstimator {
            answers,
            jobs,
            pending_met: AtomicBool::new(false),
            generation,
            give_up_after,
        }
    }

    /// Bumped each time an answer arrives: what waited may be decided.
    pub fn generation(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.generation)
    }

    fn estimate(&self, sql: &str) -> Result<Estimate, String> {
        let now = Instant::now();
        let mut answers = lock(&self.answers);
        match answers.get(sql) {
            Some(Asked::Ready { answer, at }) if now.duration_since(*at) < ANSWER_FRESH => {
                return answer.clone();
            }
            Some(Asked::Asking { since }) => {
                if now.duration_since(*since) > self.give_up_after {
                    return Err(format!("no estimate within {:?}", self.give_up_after));
                }
                self.pending_met.store(true, Ordering::Release);
                return Err(ESTIMATE_PENDING.into());
            }
            _ => {}
        }
        // Refused before anything is queued (parsed once per new text, not
        // once per rule that asks): nothing to wait for.
        plannable(sql).map_err(|e| e.to_string())?;
        answers.insert(sql.to_owned(), Asked::Asking { since: now });
        drop(answers);
        if self.jobs.send(sql.to_owned()).is_err() {
            return Err("the estimator's threads are gone".into());
        }
        self.pending_met.store(true, Ordering::Release);
        Err(ESTIMATE_PENDING.into())
    }
}

impl RowEstimator for DeferredEstimator {
    fn estimate_rows(&self, statement: &StatementFacts) -> Result<u64, String> {
        self.estimate(&statement.sql).map(|e| e.rows)
    }

    fn estimate_cost(&self, statement: &StatementFacts) -> Result<f64, String> {
        self.estimate(&statement.sql).map(|e| e.cost)
    }

    fn take_pending(&self) -> bool {
        self.pending_met.swap(false, Ordering::AcqRel)
    }
}

/// Histogram, seconds: how long the planner took to answer one estimate
/// (the gate's statement waits that long, off the capture loop).
pub const ESTIMATE_LATENCY: &str = "qgate_estimate_seconds";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn select_estimate_is_the_top_plan_rows() {
        let plan = json!([{"Plan": {"Node Type": "Seq Scan", "Plan Rows": 1234.0}}]);
        assert_eq!(rows_from_plan(&plan).unwrap(), 1234);
    }

    #[test]
    fn write_estimate_is_the_rows_the_modify_table_scans() {
        let plan = json!([{"Plan": {
            "Node Type": "ModifyTable", "Operation": "Delete", "Plan Rows": 0,
            "Plans": [{"Node Type": "Seq Scan", "Plan Rows": 100000.0}]
        }}]);
        assert_eq!(rows_from_plan(&plan).unwrap(), 100000);
    }

    #[test]
    fn write_inside_a_cte_counts() {
        let plan = json!([{"Plan": {
            "Node Type": "CTE Scan", "Plan Rows": 10,
            "Plans": [{"Node Type": "ModifyTable", "Plan Rows": 0,
                "Plans": [{"Node Type": "Seq Scan", "Plan Rows": 5e4}]}]
        }}]);
        assert_eq!(rows_from_plan(&plan).unwrap(), 50000);
    }

    #[test]
    fn cost_is_the_top_plans_total_cost() {
        let plan =
            json!([{"Plan": {"Node Type": "Seq Scan", "Plan Rows": 5, "Total Cost": 1234.5}}]);
        assert_eq!(cost_from_plan(&plan).unwrap(), 1234.5);
        assert!(cost_from_plan(&json!([{"Plan": {"Plan Rows": 5}}])).is_err());
    }

    #[test]
    fn malformed_plans_are_errors() {
        assert!(rows_from_plan(&json!({})).is_err());
        assert!(rows_from_plan(&json!([{"Plan": {"Node Type": "X"}}])).is_err());
        assert!(rows_from_plan(&json!([{"Plan": {"Plan Rows": "many"}}])).is_err());
    }

    #[test]
    fn several_statements_are_refused_before_connecting() {
        let config = EstimatorConfig {
            host: "127.0.0.1".into(),
            port: 1,
            user: "x".into(),
            dbname: "x".into(),
            password: None,
        };
        let err =
            explain_rows(&config, "SELECT 1; DROP TABLE t", Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, EstimateError::Refused(_)), "{err}");
        let err = explain_rows(&config, "DROP TABLE t", Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, EstimateError::Refused(_)), "{err}");
        let err = explain_rows(
            &config,
            "EXPLAIN ANALYZE DELETE FROM t",
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(err, EstimateError::Refused(_)), "{err}");
    }

    /// The caller never waits: the first ask is pending (and says so once),
    /// the answer arrives on another thread and rings, then it serves; an
    /// answer that never comes counts as none after the limit; a string
    /// that cannot be planned is refused without queueing.
    #[test]
    fn deferred_estimates_are_asked_off_the_callers_thread() {
        let (release, released) = crossbeam_channel::unbounded::<()>();
        let asked = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&asked);
        let ask: Ask = Arc::new(move |sql: &str| {
            counted.fetch_add(1, Ordering::SeqCst);
            if sql.contains("forever") {
                std::thread::sleep(Duration::from_secs(3600));
            }
            released.recv().map_err(|e| e.to_string())?;
            Ok(Estimate {
                rows: 42,
                cost: 7.5,
            })
        });
        let (rang, rings) = crossbeam_channel::unbounded::<()>();
        let est = DeferredEstimator::start(
            ask,
            Duration::from_millis(300),
            Box::new(move || {
                let _ = rang.send(());
            }),
        );
        let generation = est.generation();
        let sql = "SELECT * FROM big";
        assert_eq!(est.estimate(sql).unwrap_err(), ESTIMATE_PENDING);
        assert!(est.take_pending());
        assert!(!est.take_pending(), "said once");
        // Asked again while pending: still pending, not asked twice.
        assert_eq!(est.estimate(sql).unwrap_err(), ESTIMATE_PENDING);
        assert!(est.take_pending());
        release.send(()).unwrap();
        rings.recv_timeout(Duration::from_secs(10)).expect("a ring");
        assert_eq!(generation.load(Ordering::SeqCst), 1);
        assert_eq!(
            est.estimate(sql).unwrap(),
            Estimate {
                rows: 42,
                cost: 7.5
            }
        );
        assert!(!est.take_pending());
        assert_eq!(asked.load(Ordering::SeqCst), 1);

        assert!(est.estimate("SELECT * FROM forever").is_err());
        std::thread::sleep(Duration::from_millis(400));
        let late = est.estimate("SELECT * FROM forever").unwrap_err();
        assert!(late.starts_with("no estimate within"), "{late}");
        assert!(est.take_pending(), "the first ask was pending");
        assert!(
            !est.take_pending(),
            "the late one is an answer (fail closed)"
        );

        let refused = est.estimate("SELECT 1; SELECT 2").unwrap_err();
        assert!(refused.contains("2 statements"), "{refused}");
        assert!(!est.take_pending());
    }
}
