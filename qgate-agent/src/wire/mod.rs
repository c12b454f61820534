//! From TCP segments to protocol facts: per-connection stream reassembly and
//! PostgreSQL (protocol 3.0) decoding, frontend and backend.
//!
//! The door is [`Tracker`]: feed it every [`Segment`](crate::capture::Segment)
//! of every connection, get [`WireEvent`]s back. It never panics on input;
//! what it cannot decode becomes [`WireEvent::Undecodable`].
//!
//! | module | does |
//! | --- | --- |
//! | [`tcp`] | puts one direction's segments back in order, reports gaps |
//! | [`pg`] | decodes client and server messages incrementally |
//! | [`mysql`] | the MySQL/MariaDB protocol: framing, packets, a connection's conversation (not yet fed by the tracker) |
//! | `session` | pairs statements with the server's answers |
//! | `tracker` | owns every connection; opens, feeds and closes them |
pub mod events;
pub mod mysql;
pub mod pg;
mod session;
pub mod tcp;
mod tracker;

pub use events::*;
pub use tracker::{
    ClientMessage, ClientSql, SqlCarrier, StatementSpan, StreamSpan, Tracker, MAX_CONNECTIONS,
};
