//! From TCP segments to protocol facts: per-connection stream reassembly and
//! PostgreSQL (protocol 3.0) decoding, frontend and backend.
//!
//! The door is [`Tracker`]: feed it every [`Segment`](crate::capture::Segment)
//! of every connection, get [`WireEvent`]s back. It never panics on input;
//! what it cannot decode becomes [`WireEvent::Undecodable`].
pub mod events;

pub use events::*;
