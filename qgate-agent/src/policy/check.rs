//! `qgate-agent policy check`: one statement string through classify and decide,
//! reported for people (text) or programs (JSON).
use std::fmt::Write as _;

use serde::Serialize;

use super::{Action, Policy, RowEstimator, Subject};
use crate::classify::{classify, Dialect, StatementFacts};

/// What `policy check` prints.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    /// allow, audit-only, hold or deny.
    pub decision: &'static str,
    /// The rule that fired, or `default`.
    pub rule: String,
    #[serde(flatten)]
    pub action: Action,
    pub reasons: Vec<String>,
    pub subject: Subject,
    pub fingerprint: Option<String>,
    pub statements: Vec<StatementFacts>,
}

/// Classifies `sql` and decides it for `subject`.
pub fn check(
    policy: &Policy,
    subject: &Subject,
    sql: &str,
    dialect: Dialect,
    estimator: &dyn RowEstimator,
) -> CheckReport {
    let classification = classify(sql, dialect);
    let decision = policy.decide(subject, &classification, estimator);
    CheckReport {
        decision: decision.action.name(),
        rule: decision.rule,
        action: decision.action,
        reasons: decision.reasons,
        subject: subject.clone(),
        fingerprint: classification.fingerprint,
        statements: classification.statements,
    }
}

impl CheckReport {
    /// The report as plain text: decision and rule first, then each statement's facts.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_text(&mut out);
        out
    }

    fn write_text(&self, out: &mut String) -> std::fmt::Result {
        writeln!(out, "decision: {}", self.decision)?;
        writeln!(out, "rule: {}", self.rule)?;
        match &self.action {
            Action::Hold {
                approvals,
                reviewer_groups,
            } => writeln!(
                out,
                "approvals: {approvals} from {}",
                reviewer_groups.join(", ")
            )?,
            Action::Deny { message } => writeln!(out, "message: {message}")?,
            Action::Allow | Action::AuditOnly => {}
        }
        for reason in &self.reasons {
            writeln!(out, "  {reason}")?;
        }
        for (i, s) in self.statements.iter().enumerate() {
            writeln!(out, "statement {}: {}", i + 1, s.sql.trim())?;
            writeln!(out, "  kind: {}", s.kind)?;
            writeln!(out, "  verb: {}", s.verb)?;
            let list = |v: Vec<String>| {
                if v.is_empty() {
                    "-".to_owned()
                } else {
                    v.join(", ")
                }
            };
            writeln!(
                out,
                "  tables read: {}",
                list(s.tables_read.iter().map(ToString::to_string).collect())
            )?;
            writeln!(
                out,
                "  tables written: {}",
                list(s.tables_written.iter().map(ToString::to_string).collect())
            )?;
            writeln!(out, "  functions: {}", list(s.functions.clone()))?;
            if !s.settings.is_empty() {
                writeln!(out, "  settings: {}", s.settings.join(", "))?;
            }
            writeln!(
                out,
                "  flags: {}",
                list(s.flags.iter().map(|f| f.name().to_owned()).collect())
            )?;
            if let Some(error) = &s.error {
                writeln!(out, "  not understood: {error}")?;
            }
        }
        Ok(())
    }
}
