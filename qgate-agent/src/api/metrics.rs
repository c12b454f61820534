//! The agent's Prometheus metrics, served at `/metrics`.
//!
//! Any stage records through the `metrics` facade with these names, e.g.
//! `metrics::counter!(qgate_agent::api::metrics::STATEMENTS_SEEN).increment(1)`;
//! [`install`] sets the process-wide recorder the API renders.
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

// Each stage names what it measures; the API describes and serves them all.
pub use crate::board::metrics::{AUDIT_FAILURES, HELD_NOW, REQUEST_EVENTS, REQUEST_WAIT};
pub use crate::gate::metrics::{DECISIONS, DECISION_LATENCY, SHADOW};
pub use crate::pipeline::metrics::{CAPTURE_LOST, STATEMENTS_SEEN};
pub use crate::policy::estimate::ESTIMATE_LATENCY;
/// Counter, label `outcome` = `delivered` | `failed`: webhook deliveries.
pub const WEBHOOKS: &str = "qgate_webhook_deliveries_total";

/// Installs the Prometheus recorder once per process and returns its handle.
/// If another recorder was installed first, the handle renders an empty page.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Only empty bucket lists fail, and these are constants.
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(DECISION_LATENCY.to_owned()),
                    &[
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(REQUEST_WAIT.to_owned()),
                        &[1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0],
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(ESTIMATE_LATENCY.to_owned()),
                        &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0],
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new())
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(
        AUDIT_FAILURES,
        "Audit entries the agent could not write (logged; decisions fail closed)"
    );
    metrics::describe_counter!(STATEMENTS_SEEN, "Statements decoded from the wire");
    metrics::describe_counter!(DECISIONS, "Policy decisions by kind");
    metrics::describe_counter!(
        SHADOW,
        "What rules marked shadow = true would have done, by rule"
    );
    metrics::describe_histogram!(
        DECISION_LATENCY,
        metrics::Unit::Seconds,
        "Gated segment arrival to policy decision"
    );
    metrics::describe_histogram!(
        ESTIMATE_LATENCY,
        metrics::Unit::Seconds,
        "One planner estimate asked by the gate (off the capture loop)"
    );
    metrics::describe_counter!(CAPTURE_LOST, "Segments or events lost by the capture");
    metrics::describe_gauge!(HELD_NOW, "Requests waiting for reviewers now");
    metrics::describe_counter!(REQUEST_EVENTS, "Request lifecycle events by kind");
    metrics::describe_histogram!(
        REQUEST_WAIT,
        metrics::Unit::Seconds,
        "Time from hold to decision, expiry or withdrawal"
    );
    metrics::describe_counter!(WEBHOOKS, "Webhook deliveries by outcome");
    // Zero-valued series from the start, so dashboards see them before the first event.
    metrics::counter!(STATEMENTS_SEEN).absolute(0);
    metrics::counter!(CAPTURE_LOST).absolute(0);
}
