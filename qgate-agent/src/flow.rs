//! What names a connection ([`Flow`]), which way its bytes go
//! ([`Direction`]), how it reached the server ([`Transport`]) and how much
//! it is gated ([`GateMode`]): the vocabulary every stage shares, below all
//! of them (capture, the kernel maps, wire, policy, gate and store import
//! it; it imports nothing of theirs).
use std::net::SocketAddr;

use qgate_common::mode;
use serde::Serialize;

/// Which way a segment travels, relative to the database server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    ToServer,
    FromServer,
}

/// A TCP connection, named from the server's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    pub client: SocketAddr,
    pub server: SocketAddr,
}

/// The client/server protocol a connection speaks (by its server port:
/// `capture.ports` and `capture.mysql_ports`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Postgresql,
    Mysql,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Postgresql => "postgresql",
            Protocol::Mysql => "mysql",
        }
    }
}

/// How a session reached the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    #[default]
    Tcp,
    Tls,
    Gss,
    Unix,
    /// TCP first seen mid-stream by the server hook: TLS or not is unknown.
    Unknown,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Gss => "gss",
            Transport::Unix => "unix",
            Transport::Unknown => "unknown",
        }
    }
}

/// How much a connection is gated: what the policy asks for an identity
/// (`policy::needs_gate`) and what the programs are told (`as_raw`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GateMode {
    /// No statement from this identity can be held or denied: only watch.
    Monitor,
    /// Some statements may be held or denied, but never a plain read (one
    /// SELECT/SHOW with no function call, INTO or FOR): the kernel may pass
    /// those and send the rest to userspace.
    GateRisky,
    /// Even a plain read may be held (a rule on tables, tags, row estimates
    /// or the clock applies): every SQL-bearing message goes to userspace.
    GateAll,
    /// The policy refuses this identity outright: every statement is denied.
    Deny,
}

impl GateMode {
    pub fn as_raw(self) -> u8 {
        match self {
            GateMode::Monitor => mode::MONITOR,
            GateMode::GateRisky => mode::GATE_RISKY,
            GateMode::GateAll => mode::GATE_ALL,
            GateMode::Deny => mode::DENY,
        }
    }
}
