//! After an agent restart: the requests a previous agent left pending are
//! taken over (statements held on the wire come back with their client's
//! next retransmission and find their request; stopped backends are taken
//! over from the request's stored state), and those whose statement never
//! comes back are withdrawn.
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::Gate;
use crate::{
    board::RequestEvent,
    store::requests::{RequestFilter, RequestStatus},
    FastMap as HashMap,
};

/// The requests a previous agent left pending on the wire path, until their
/// statements come back.
#[derive(Debug)]
pub(super) struct Recovery {
    /// By (client address, redacted text): the statement comes back with
    /// the client's next retransmission and is attached to its request
    /// instead of opening a second one.
    pending: HashMap<(String, String), i64>,
    /// Final events of recovered requests whose statement has not come
    /// back yet.
    finals: HashMap<i64, RequestEvent>,
    /// When [`Gate::recover`] ran.
    at: Option<Instant>,
    /// How long recovered requests may wait for their statement before
    /// they are withdrawn.
    grace: Duration,
}

impl Default for Recovery {
    fn default() -> Self {
        Recovery {
            pending: HashMap::default(),
            finals: HashMap::default(),
            at: None,
            grace: Duration::from_secs(150),
        }
    }
}

impl Recovery {
    /// The recovered request of this statement from this client, if any
    /// (taken: one statement, one request).
    pub(super) fn reclaim(&mut self, client: &str, statement: &str) -> Option<i64> {
        self.pending
            .remove(&(client.to_owned(), statement.to_owned()))
    }

    /// A final event for a request the gate does not wait on: kept if the
    /// request is a recovered one whose statement may still come back.
    pub(super) fn keep_final(&mut self, event: &RequestEvent) {
        if self.pending.values().any(|id| *id == event.request_id) {
            self.finals.insert(event.request_id, event.clone());
        }
    }

    /// The final event a request met while its statement was on its way back.
    pub(super) fn take_final(&mut self, request: i64) -> Option<RequestEvent> {
        self.finals.remove(&request)
    }
}

impl Gate {
    /// Takes over the requests a previous agent left pending (it was killed
    /// or restarted while the kernel kept holding their statements).
    pub fn recover(&mut self) -> usize {
        let filter = RequestFilter {
            status: Some(RequestStatus::Pending),
            limit: 10_000,
            ..RequestFilter::default()
        };
        let pending = match self.runtime.block_on(self.board.list(filter)) {
            Ok(pending) => pending,
            Err(e) => {
                warn!("listing pending requests to recover: {e}");
                return 0;
            }
        };
        for request in pending.iter().filter(|r| r.backend_pid.is_none()) {
            if let Some(client) = &request.identity.client_addr {
                self.recovery
                    .pending
                    .insert((client.clone(), request.statement.clone()), request.id);
            }
        }
        if !self.recovery.pending.is_empty() {
            self.recovery.at = Some(Instant::now());
        }
        self.recover_backends(&pending);
        pending.len()
    }

    /// `gate.recovery_grace_s`: see [`Gate::withdraw_unreturned`].
    pub fn set_recovery_grace(&mut self, grace: Duration) {
        self.recovery.grace = grace;
    }

    /// Withdraws the recovered requests whose statement did not come back
    /// within the grace period: a live client retransmits a held segment at
    /// least every 120 s (TCP's largest RTO), so its connection is gone.
    pub(super) fn withdraw_unreturned(&mut self) {
        let grace = self.recovery.grace;
        let due = self.recovery.at.is_some_and(|at| at.elapsed() >= grace);
        if !due {
            return;
        }
        self.recovery.at = None;
        let why = format!(
            "its client did not send the statement again within {} s of the agent's restart: \
             the connection is gone",
            grace.as_secs()
        );
        for ((client, _), id) in std::mem::take(&mut self.recovery.pending) {
            self.recovery.finals.remove(&id);
            match self.runtime.block_on(self.board.withdraw(id, &why)) {
                Ok(_) => info!(request = id, client, "recovered request withdrawn: {why}"),
                // Decided meanwhile: nothing to withdraw.
                Err(e) => debug!(request = id, "withdrawing a recovered request: {e}"),
            }
        }
    }
}
