//! Capture losses, fail-open passes, refused segments, shed connections and
//! store drops: counted by the kernel or the agent, looked at every
//! heartbeat, and logged, audited and recorded so none is silent.
use tracing::warn;

use crate::pipeline::Pipeline;

/// What the kernel counted or the agent shed since the last look: logged,
/// audited and recorded each heartbeat, so no loss or fail-open is silent.
#[derive(Default)]
pub(super) struct LossWatch {
    lost: u64,
    failed_open: u64,
    refused: u64,
    shed: u64,
    dropped: u64,
}

impl LossWatch {
    pub(super) fn check(
        &mut self,
        counters: &qgate_common::Counters,
        pipeline: &Pipeline,
        audit: impl Fn(crate::store::audit::Kind, serde_json::Value),
    ) {
        use crate::store::audit::kinds;
        if counters.failed_open > self.failed_open {
            // The kernel passed gated traffic while no agent was there.
            let passed = counters.failed_open - self.failed_open;
            warn!(
                passed,
                "fail-open: statements passed unreviewed while the agent was gone"
            );
            audit(
                kinds::AGENT_FAILED_OPEN,
                serde_json::json!({ "segments_passed_unreviewed": passed }),
            );
            self.failed_open = counters.failed_open;
        }
        if counters.refused_segments > self.refused {
            let dropped = counters.refused_segments - self.refused;
            warn!(
                dropped,
                "segments to a database port were dropped: the server would read them \
                 differently from qgate (IP fragments, TCP urgent data, or a new copy of \
                 bytes already let through that the server had not acknowledged)"
            );
            audit(
                kinds::CAPTURE_REFUSED_SEGMENTS,
                serde_json::json!({
                    "segments": dropped,
                    "why": "IP fragment, TCP urgent data, or a retransmission of unacknowledged bytes already let through",
                }),
            );
            self.refused = counters.refused_segments;
        }
        let shed = pipeline.tracker().shed();
        if shed > self.shed {
            warn!(
                connections = shed - self.shed,
                limit = crate::wire::MAX_CONNECTIONS,
                "connection table full: connections that carried no byte were forgotten"
            );
            audit(
                kinds::CAPTURE_CONNECTIONS_SHED,
                serde_json::json!({ "connections": shed - self.shed }),
            );
            self.shed = shed;
        }
        let dropped = pipeline.writer().stats().dropped;
        if counters.lost() != self.lost || dropped != self.dropped {
            ::metrics::counter!(crate::pipeline::metrics::CAPTURE_LOST).increment(
                counters.lost().saturating_sub(self.lost) + dropped.saturating_sub(self.dropped),
            );
            warn!(
                ringbuf_full = counters.ringbuf_full,
                truncated = counters.truncated,
                load_errors = counters.load_errors,
                hook_lost = counters.hook_lost,
                "capture loss: some statements were not seen whole"
            );
            if dropped != self.dropped {
                warn!(
                    dropped,
                    "the store fell behind the capture: events were dropped"
                );
            }
            self.lost = counters.lost();
            self.dropped = dropped;
            pipeline
                .writer()
                .record_capture_loss(crate::clock::now(), *counters);
        }
    }
}
