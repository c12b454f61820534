//! Row and cost estimates for `estimated_rows_above` and
//! `estimated_cost_above`: the planner's own guess, asked over the agent's
//! separate read-only connection (one EXPLAIN answers both).
//!
//! The statement is never executed: it is sent as `EXPLAIN (FORMAT JSON) …`
//! without ANALYZE, over the extended protocol (which refuses several
//! commands in one string), inside a READ ONLY transaction that is rolled
//! back, with a statement timeout. Strings that are not exactly one plannable
//! statement are refused before anything is sent.
use std::{sync::mpsc, time::Duration};

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
}
