//! Refusing held bytes on the wire: a same-length rewrite of the statement
//! re-injected in its place, or, where no rewrite is possible, a reset of
//! both sides before the server has the message whole; and withdrawing the
//! requests of clients that went away.
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{
    rewrite::{self, DenialRef},
    Gate, Holder,
};
use crate::{
    flow::Flow,
    wire::{ConnId, SqlCarrier, Tracker},
};

impl Gate {
    pub(super) fn deny_front(&mut self, flow: &Flow, id: DenialRef, reason: &str) {
        let Some(stream) = self.held_mut(flow) else {
            return;
        };
        let Some(front) = stream.front() else {
            return;
        };
        let len = front.text_end.wrapping_sub(front.text_start) as usize;
        // Only the held bytes are rewritten: the rest of an incomplete
        // message must still reach the server, inside the opened string.
        let (start, end) = (front.start, front.text_end);
        let mysql = self
            .info(flow)
            .is_some_and(|i| i.dialect == crate::classify::Dialect::Mysql);
        let Some(stream) = self.held_mut(flow) else {
            return;
        };
        let Some(front) = stream.front() else {
            return;
        };
        if mysql && front.tail {
            // The server has the packet's first bytes and MySQL has no
            // spelling that makes any prefix fail whatever it opened:
            // the connection is closed, and nothing of the packet runs.
            self.reset_held(
                flow,
                id,
                reason,
                "a long MySQL statement held by its end is refused by closing the connection",
            );
            return;
        }
        let replacement = if mysql {
            match front.info.carrier {
                // COM_SLEEP: "Unknown command" (error 1047); the session
                // goes on.
                SqlCarrier::Command => (len == 1).then(|| vec![0]),
                SqlCarrier::Startup => rewrite::mysql_login_refusal(len, id, reason),
                carrier if len > 0 && !front.incomplete => Some(rewrite::mysql_denial_text(
                    len,
                    id,
                    reason,
                    carrier == SqlCarrier::Parse,
                )),
                _ => None,
            }
        } else if front.info.carrier == SqlCarrier::Startup {
            rewrite::startup_refusal(len, id, reason)
        } else if front.info.carrier == SqlCarrier::FunctionCall {
            // An OID no function has: "function with OID 0 does not exist".
            (len == 4 && !front.incomplete).then(|| vec![0; 4])
        } else if front.tail {
            // The server has the message's first bytes: the held end makes
            // the whole string fail to parse (a newline, then a dollar quote
            // whose tag is nowhere in the text), or, with no room for that,
            // the connection is closed and nothing of it runs.
            let mut nonce = [0u8; 8];
            let _ = getrandom::fill(&mut nonce);
            let tail = (front.info.carrier == SqlCarrier::Query)
                .then(|| {
                    rewrite::tail_denial_text(len, id, u64::from_le_bytes(nonce), &front.info.text)
                })
                .flatten();
            if tail.is_none() {
                self.reset_held(
                    flow,
                    id,
                    reason,
                    "the held end of the statement leaves no room for a rewrite",
                );
                return;
            }
            tail
        } else if front.incomplete {
            let mut nonce = [0u8; 8];
            let _ = getrandom::fill(&mut nonce);
            rewrite::prefix_denial_text(len, id, u64::from_le_bytes(nonce))
        } else if len > 0 {
            Some(rewrite::denial_text(len, id, reason))
        } else {
            None
        };
        let Some(replacement) = replacement else {
            // Nothing to rewrite (a prefix too short to open a string, or a
            // FunctionCall not seen whole): the bytes stay held until the
            // client gives up; nothing of them runs.
            warn!("cannot rewrite this message; it stays held");
            return;
        };
        stream.deny_front(replacement);
        if let Err(e) = self.kernel.deny_range(flow, start, end) {
            warn!("recording the denied range: {e}");
        }
    }

    /// Ends a connection whose held bytes qgate cannot vouch for (see
    /// `reset_held`): its waiting request is withdrawn with `reason`.
    pub(super) fn reset_unreadable(&mut self, flow: &Flow, reason: &str, why: &str) {
        self.withdraw(flow, reason);
        self.reset_held(flow, DenialRef::Unrecorded, reason, why);
    }

    /// Ends a connection whose held message cannot be refused by a rewrite
    /// (the held end of a long Parse, or too short a held end): both sides
    /// get a reset, the server before it has the message whole, so nothing
    /// of it runs. Audited.
    pub(super) fn reset_held(&mut self, flow: &Flow, id: DenialRef, reason: &str, why: &str) {
        let Some(stream) = self.conns.get_mut(flow).and_then(|c| c.drop_held()) else {
            return;
        };
        self.tidy(flow);
        let client_seq = stream.base();
        let server_seq = stream
            .template()
            .get(8..12)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        let result = match server_seq {
            Some(server_seq) => self
                .injector
                .reset_both(flow, server_seq, client_seq)
                .map_err(|e| e.to_string()),
            None => Err("no TCP header was captured".to_string()),
        };
        if let Err(e) = &result {
            warn!(
                ?flow,
                "resetting the connection of a refused statement: {e}"
            );
        }
        let details = serde_json::json!({
            "request": id.request(),
            "decision": id.decision(),
            "client": flow.client.to_string(),
            "reason": reason,
            "why": why,
            "reset": result.is_ok(),
        });
        let _ = self.runtime.block_on(
            self.board
                .audit(crate::store::audit::kinds::CONNECTION_RESET, details),
        );
    }

    /// A TLS handshake the program held under `gate.unreadable =
    /// "refuse"` (the server accepted TLS; qgate could not read the
    /// session): both sides are reset before the handshake and the decision
    /// is audited. No error text can reach the client here: libpq (15.8 on)
    /// shows no server error during the SSL exchange, and after the
    /// server's `S` only TLS is expected.
    pub(super) fn refuse_encrypted(
        &mut self,
        flow: &Flow,
        tracker: &mut Tracker,
        conn: ConnId,
        seq: u32,
    ) {
        let details = serde_json::json!({
            "decision": "deny",
            "reason": "qgate: an encrypted session cannot be read on this port (server hook \
                       not attached): refused before its TLS handshake",
            "client": flow.client.to_string(),
        });
        match self.runtime.block_on(
            self.board
                .audit(crate::store::audit::kinds::DECISION, details),
        ) {
            Ok(id) => info!(decision = id, ?flow, "encrypted session refused"),
            Err(e) => warn!("auditing a refused encrypted session: {e}"),
        }
        // The server sent its one-byte `S`: its next sequence number.
        let reset = tracker
            .server_seq_at(conn, 1)
            .ok_or_else(|| "the server's sequence numbers were not seen".to_string())
            .and_then(|server_seq| {
                self.injector
                    .reset_both(flow, server_seq, seq)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = reset {
            // The handshake stays dropped: the client times out instead.
            warn!(?flow, "resetting an unreadable session: {e}");
        }
        if let Some(c) = self.conns.get_mut(flow) {
            c.drop_held();
        }
        self.tidy(flow);
        tracker.watch(flow, false);
    }

    /// Withdraws the requests of held statements whose client runs on this
    /// host and has closed its socket. Such a client's FIN never shows on
    /// the wire while its statement is held: once a retransmission timeout
    /// has cut its congestion window to one segment, the FIN waits behind
    /// the held (unacknowledged) bytes. The socket table shows it at once.
    /// (A remote client's close shows only when its FIN or RST can be sent;
    /// until then its request waits for its expiry.)
    pub(super) fn withdraw_closed_local_clients(&mut self) {
        let waiting: Vec<Flow> = self
            .awaited
            .values()
            .filter_map(|a| match a.holder {
                Holder::Wire(flow) => Some(flow),
                Holder::Backend(_) => None,
            })
            .collect();
        if waiting.is_empty() || self.last_socket_look.elapsed() < SOCKET_LOOK_EVERY {
            return;
        }
        self.last_socket_look = Instant::now();
        let closed = closed_local_sockets();
        if closed.is_empty() {
            return;
        }
        let gone: Vec<Flow> = waiting
            .into_iter()
            .filter(|flow| closed.contains(&(flow.client, flow.server)))
            .collect();
        for flow in gone {
            info!(
                ?flow,
                "the client closed its socket while its statement was held"
            );
            self.withdraw(&flow, "the client disconnected");
        }
    }

    /// Withdraws the request the connection waits on, if any.
    pub(super) fn withdraw(&mut self, flow: &Flow, why: &str) {
        let Some(id) = self
            .held_mut(flow)
            .and_then(|s| s.front())
            .and_then(|f| f.request)
        else {
            return;
        };
        if let Err(e) = self.runtime.block_on(self.board.withdraw(id, why)) {
            warn!("withdrawing request {id}: {e}");
        }
    }
}

/// How often the socket table is read while wire requests are pending.
const SOCKET_LOOK_EVERY: Duration = Duration::from_millis(500);

/// (local, remote) of this network namespace's TCP sockets that their
/// owner has closed (FIN-WAIT, CLOSING, TIME-WAIT, LAST-ACK, CLOSE), with
/// IPv4-mapped addresses read as IPv4.
fn closed_local_sockets() -> crate::FastSet<(std::net::SocketAddr, std::net::SocketAddr)> {
    use procfs::net::TcpState;
    let plain = |a: std::net::SocketAddr| match a {
        std::net::SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => std::net::SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    };
    let tables = [procfs::net::tcp(), procfs::net::tcp6()];
    tables
        .into_iter()
        .filter_map(Result::ok)
        .flatten()
        .filter(|e| {
            matches!(
                e.state,
                TcpState::FinWait1
                    | TcpState::FinWait2
                    | TcpState::Closing
                    | TcpState::TimeWait
                    | TcpState::LastAck
                    | TcpState::Close
            )
        })
        .map(|e| (plain(e.local_address), plain(e.remote_address)))
        .collect()
}
