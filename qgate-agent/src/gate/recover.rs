//! After an agent restart: the requests a previous agent left pending are
//! taken over (statements held on the wire come back with their client's
//! next retransmission and find their request; stopped backends are taken
//! over from the request's stored state), and those whose statement never
//! comes back are withdrawn.
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::Gate;
use crate::store::requests::{RequestFilter, RequestStatus};

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
                self.recovered
                    .insert((client.clone(), request.statement.clone()), request.id);
            }
        }
        if !self.recovered.is_empty() {
            self.recovered_at = Some(Instant::now());
        }
        self.recover_backends(&pending);
        pending.len()
    }

    /// `gate.recovery_grace_s`: see [`Gate::withdraw_unreturned`].
    pub fn set_recovery_grace(&mut self, grace: Duration) {
        self.recovery_grace = grace;
    }

    /// Withdraws the recovered requests whose statement did not come back
    /// within the grace period: a live client retransmits a held segment at
    /// least every 120 s (TCP's largest RTO), so its connection is gone.
    pub(super) fn withdraw_unreturned(&mut self) {
        let due = self
            .recovered_at
            .is_some_and(|at| at.elapsed() >= self.recovery_grace);
        if !due {
            return;
        }
        self.recovered_at = None;
        let why = format!(
            "its client did not send the statement again within {} s of the agent's restart: \
             the connection is gone",
            self.recovery_grace.as_secs()
        );
        for ((client, _), id) in std::mem::take(&mut self.recovered) {
            self.recovered_final.remove(&id);
            match self.runtime.block_on(self.board.withdraw(id, &why)) {
                Ok(_) => info!(request = id, client, "recovered request withdrawn: {why}"),
                // Decided meanwhile: nothing to withdraw.
                Err(e) => debug!(request = id, "withdrawing a recovered request: {e}"),
            }
        }
    }
}
