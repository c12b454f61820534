//! Where segments come from: the tc programs through the ring buffer
//! ([`kernel`]), or a capture file ([`pcap`]). Both yield [`Segment`]s, so
//! everything after this stage runs the same on live traffic and on a pcap.
//!
//! | module | does |
//! | --- | --- |
//! | [`kernel`] | loads and attaches the tc programs (pinned links, replaced when severed), drains the rings |
//! | [`assemble`] | puts records back together from the rings' chunks (both capture points) |
//! | [`hook`] | finds the PostgreSQL servers and attaches the server hook's probes |
//! | [`attach`] | attaches the read and write probes to one backend at a time, on its own thread |
//! | [`backend`] | turns the hook's per-backend records into segments of synthetic connections |
//! | [`pcap`] | reads pcap/pcapng files into segments |
pub mod assemble;
pub mod attach;
pub mod backend;
pub mod hook;
pub mod kernel;
pub mod pcap;

use std::{
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

/// How often the agent drains the kernel's rings when nothing wakes it.
/// The programs submit ordinary records without a wake-up (each costs the
/// database's CPU an interrupt and the agent a context switch) and wake the
/// agent only for what waits on it, or when a ring fills past 1/8; so this
/// bounds how late a statement reaches the audit log, not how long any
/// client waits.
pub const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// An IPv4-mapped IPv6 address as IPv4, as the wire stage names addresses.
pub fn unmapped(ip: Ipv6Addr) -> IpAddr {
    ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4)
}

use crate::clock::UnixNanos;
use crate::flow::{Direction, Flow};

/// One TCP segment (or one GSO super-segment) of a database connection.
#[derive(Clone, Debug)]
pub struct Segment {
    pub flow: Flow,
    pub direction: Direction,
    /// Sequence number of the first payload byte (of the SYN itself for a SYN).
    pub seq: u32,
    /// TCP flag byte (RFC 9293 §3.1): FIN 0x01, SYN 0x02, RST 0x04.
    pub tcp_flags: u8,
    pub at: UnixNanos,
    pub payload: Vec<u8>,
    /// The capture lost bytes of this segment from `payload.len()` on: the
    /// stream can no longer be trusted from here.
    pub truncated: bool,
    /// The tc program dropped it to wait for a decision (live capture only).
    pub held: bool,
    /// The tc program refused it: a new copy of bytes already let through
    /// that the server has not acknowledged (`qgate_common::flags::REFUSED`).
    /// Not part of the stream: only the gate looks at it.
    pub refused: bool,
    /// The raw TCP header, options included (live to-server segments only;
    /// empty otherwise): what a re-injected copy is rebuilt from.
    pub tcp_header: Vec<u8>,
}

impl Segment {
    pub fn is_syn(&self) -> bool {
        self.tcp_flags & qgate_common::tcp_flags::SYN != 0
    }
    pub fn is_fin(&self) -> bool {
        self.tcp_flags & qgate_common::tcp_flags::FIN != 0
    }
    pub fn is_rst(&self) -> bool {
        self.tcp_flags & qgate_common::tcp_flags::RST != 0
    }
}
