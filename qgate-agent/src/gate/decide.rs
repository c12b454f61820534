//! Deciding one message: the judge's ruling carried out (the request
//! opened, the denial audited, the store told, the session's state
//! updated) and counted.
use std::time::Instant;

use tracing::{info, warn};

use super::{
    held::PendingSql,
    judge::{Judged, Origin, Ruling},
    metrics,
    rewrite::DenialRef,
    Gate, Outcome, SqlInfo,
};
use crate::{
    flow::{Flow, Transport},
    store::StatementDecision,
    wire::SqlCarrier,
};

impl Gate {
    /// Rules on one message and carries the ruling out (request, audit,
    /// the store's record, the session's state); the caller holds, releases
    /// or refuses the bytes.
    pub(super) fn decide(&mut self, flow: &Flow, sql: &PendingSql<SqlInfo>) -> Outcome {
        let started = Instant::now();
        let mut info = self.info(flow).cloned().unwrap_or_default();
        if info.database_pending {
            // A USE on its way: the database the statement runs in is not known.
            info.subject.database = None;
        }
        let origin = Origin {
            client: self.client_of(flow),
            server: self.hook(flow).map_or(Some(flow.server), |h| h.server),
            // The wire reads plaintext TCP only; the hook knows.
            transport: self.hook(flow).map_or(Transport::Tcp, |h| h.transport),
        };
        let Judged {
            ruling,
            shadow,
            changes_session,
            hides_session_change,
        } = self.judge.rule(&info, sql, origin);
        if info.dialect == crate::classify::Dialect::Mysql {
            // Whether or not it runs: a statement that may change how the
            // server reads text makes later ones read with care, and one
            // that may change the database leaves it unknown until the
            // server's answer (`WireEvent::Identified`).
            // Any statement of the text (`SELECT 1; USE prod`, one in an
            // executable comment), not only its start.
            let uses = crate::contains_ignoring_case(&sql.info.text, "use")
                && crate::wire::mysql::track::use_database(&sql.info.text).is_some();
            if let Some(info) = self.info_mut(flow) {
                info.lexing
                    .mysql_statement(&sql.info.text, hides_session_change);
                info.database_pending |= uses;
                info.session_changed |= changes_session;
            }
        }
        self.audit_shadow(shadow);
        let outcome = self.carry_out(flow, sql, ruling);
        let label = match &outcome {
            Outcome::Allow => "allow",
            Outcome::Deny { .. } => "deny",
            Outcome::Wait { .. } => "hold",
            Outcome::Defer => return outcome,
        };
        ::metrics::counter!(metrics::DECISIONS, "decision" => label).increment(1);
        ::metrics::histogram!(metrics::DECISION_LATENCY).record(started.elapsed().as_secs_f64());
        outcome
    }

    pub(super) fn carry_out(
        &mut self,
        flow: &Flow,
        sql: &PendingSql<SqlInfo>,
        ruling: Ruling,
    ) -> Outcome {
        if !matches!(ruling, Ruling::Defer) {
            self.stats.decided += 1;
        }
        match ruling {
            Ruling::Defer => Outcome::Defer,
            Ruling::Allow {
                rule,
                schema,
                search_path,
            } => {
                if sql.info.carrier != SqlCarrier::Startup {
                    self.stats.allowed += 1;
                }
                if let Some(rule) = rule {
                    self.note_decided(sql, StatementDecision::Allow, &rule, None);
                }
                if let Some(creates_code) = schema {
                    self.schema_changed(flow, creates_code);
                }
                if search_path {
                    if let Some(info) = self.info_mut(flow) {
                        info.session_changed = true;
                    }
                }
                Outcome::Allow
            }
            Ruling::Deny { reason, rule } => {
                self.stats.denied += 1;
                if let Some(rule) = rule {
                    self.note_decided(sql, StatementDecision::Deny, &rule, None);
                }
                let id = self.audit_denial(flow, sql, &reason);
                Outcome::Deny { id, reason }
            }
            Ruling::Hold { request, schema } => {
                self.stats.held += 1;
                let client = request.identity.client_addr.clone().unwrap_or_default();
                if let Some(id) = self.recovery.reclaim(&client, &request.statement) {
                    info!(
                        request = id,
                        "statement back after an agent restart: attached to its request"
                    );
                    return Outcome::Wait { id, schema: None };
                }
                let rule = request.rule.clone();
                match self.runtime.block_on(self.board.create(*request)) {
                    Ok(request) => {
                        info!(request = request.id, %rule, "statement held for review");
                        self.note_decided(sql, StatementDecision::Hold, &rule, Some(request.id));
                        Outcome::Wait {
                            id: request.id,
                            schema,
                        }
                    }
                    Err(e) => {
                        // No request, no reviewer: refuse rather than run it unreviewed.
                        warn!("could not open a request, denying: {e}");
                        self.stats.denied += 1;
                        self.note_decided(sql, StatementDecision::Deny, &rule, None);
                        let reason = "qgate could not record the request".to_string();
                        let id = self.audit_denial(flow, sql, &reason);
                        Outcome::Deny { id, reason }
                    }
                }
            }
        }
    }

    /// What shadow rules would have done: counted, and audited without
    /// waiting (the statement goes on at once).
    pub(super) fn audit_shadow(&self, shadow: Vec<serde_json::Value>) {
        for details in shadow {
            let label = |key: &str| details[key].as_str().unwrap_or_default().to_owned();
            ::metrics::counter!(metrics::SHADOW, "rule" => label("rule"), "would" => label("would"))
                .increment(1);
            let board = self.board.clone();
            self.runtime.spawn(async move {
                let _ = board
                    .audit(crate::store::audit::kinds::POLICY_SHADOW, details)
                    .await;
            });
        }
    }

    /// Notes a policy decision on a statement for the store.
    pub(super) fn note_decided(
        &mut self,
        sql: &PendingSql<SqlInfo>,
        decision: crate::store::StatementDecision,
        rule: &str,
        request: Option<i64>,
    ) {
        if sql.info.carrier == SqlCarrier::Startup {
            return;
        }
        self.decided.push(crate::store::Decided {
            conn: sql.info.conn,
            text: sql.info.text.clone(),
            decision,
            rule: rule.to_string(),
            request,
        });
    }

    /// Records a denial that no request carries; its audit id names it. When
    /// the audit entry cannot be written (logged and counted by the board)
    /// the statement is denied all the same and the client is told the
    /// denial is unrecorded, never shown a made-up number.
    pub(super) fn audit_denial(
        &self,
        flow: &Flow,
        sql: &PendingSql<SqlInfo>,
        reason: &str,
    ) -> DenialRef {
        let details = serde_json::json!({
            "decision": "deny",
            "reason": reason,
            "statement": crate::classify::redact::redact(&sql.info.text),
            "client": flow.client.to_string(),
        });
        match self.runtime.block_on(
            self.board
                .audit(crate::store::audit::kinds::DECISION, details),
        ) {
            Ok(id) => DenialRef::Decision(id),
            Err(_) => DenialRef::Unrecorded,
        }
    }
}
