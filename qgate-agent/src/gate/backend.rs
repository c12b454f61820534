//! Holding statements inside the server: the gate's half of the server hook
//! (`qgate-ebpf/src/hook.rs`).
//!
//! The program stopped the backend (SIGSTOP) right after a read that
//! completed a message needing a decision ([`StoppedRead`]), before the
//! backend parsed anything. Every SQL-bearing message that ended in that
//! read is decided in order with the same policy as the tc path:
//! - allow: nothing to do;
//! - deny: the message is rewritten in the backend's receive buffer
//!   (`/proc/PID/mem`), so the server itself answers with an error naming
//!   qgate and the request ([`Rewrite`]);
//! - hold: a request opens; its final event allows or rewrites it.
//!
//! When nothing in the read is left waiting, the backend gets SIGCONT. While
//! it waits, the gate watches what PostgreSQL would lose: a client that hung
//! up (its socket, duplicated with `pidfd_getfd`, reports POLLRDHUP) and a
//! `pg_cancel_backend` / `pg_terminate_backend` (SIGINT / SIGTERM pending in
//! `/proc/PID/status`): each withdraws the waiting requests.
//!
//! The postgres OS user can send SIGCONT to its own backends: that account
//! owns the database anyway and is qgate's trust boundary.
use std::{
    fs::OpenOptions,
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::fs::FileExt,
    },
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{
    connection::BackendRead,
    held::PendingSql,
    rewrite::{self, DenialRef},
    Awaited, Gate, Holder, Outcome, SqlInfo,
};
use crate::{
    capture::{backend::StoppedRead, hook::ClientSocket},
    flow::Flow,
    store::requests::HookHold,
    wire::{ClientMessage, SqlCarrier, Tracker},
};

/// Where a waiting message sits in the stopped backend's receive buffer,
/// and how to refuse it there. Stored with the request (as JSON) so a
/// restarted agent can finish the job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rewrite {
    pub carrier: Carrier,
    /// First byte of the message (its type byte; a StartupMessage's length)
    /// when it is in the buffer.
    pub message_addr: Option<u64>,
    /// First writable byte of the text and how many are writable (the text
    /// may have begun in an earlier read, already copied out).
    pub text_addr: u64,
    pub writable: usize,
    /// The whole text is writable: a same-length statement replaces it.
    pub whole: bool,
    /// The byte after the text (its NUL terminator), always in the buffer.
    pub end_addr: u64,
    /// The backend's client socket descriptor, to notice a hang-up.
    pub socket_fd: Option<i32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Carrier {
    Query,
    Parse,
    FunctionCall,
    Startup,
    /// A MySQL command (never held by the server hook).
    Command,
}

impl From<SqlCarrier> for Carrier {
    fn from(c: SqlCarrier) -> Self {
        match c {
            SqlCarrier::Query => Carrier::Query,
            SqlCarrier::Parse => Carrier::Parse,
            SqlCarrier::FunctionCall => Carrier::FunctionCall,
            SqlCarrier::Startup => Carrier::Startup,
            SqlCarrier::Command => Carrier::Command,
        }
    }
}

/// A message of a stopped read waiting for reviewers.
#[derive(Debug)]
struct Waiting {
    request: i64,
    rewrite: Rewrite,
    text: String,
}

/// A backend the program stopped, until the gate resumes it.
#[derive(Debug)]
pub(super) struct StoppedBackend {
    pid: u32,
    /// The wire stage's connection (unknown for one taken over after a restart).
    flow: Option<Flow>,
    waiting: Vec<Waiting>,
    /// The client's socket, duplicated from the backend, to notice a hang-up.
    socket: Option<OwnedFd>,
    /// A withdrawal was asked for already (once is enough).
    withdrawing: bool,
}

impl StoppedBackend {
    pub(super) fn waiting_requests(&self) -> Vec<i64> {
        self.waiting.iter().map(|w| w.request).collect()
    }
}

/// SIGINT and SIGTERM bits of a `/proc/PID/status` signal mask.
const CANCEL_SIGNALS: u64 = (1 << (libc::SIGINT - 1)) | (1 << (libc::SIGTERM - 1));

impl Gate {
    /// The program stopped `read.pid`: watch its connection so the wire
    /// stage reports the messages of this read.
    pub fn backend_stopped(&mut self, read: &StoppedRead, tracker: &mut Tracker) {
        tracker.watch(&read.flow, true);
        let socket = read.socket_fd.and_then(|fd| duplicate_socket(read.pid, fd));
        self.record(read.flow).read = Some(BackendRead::Decoding {
            read: read.clone(),
            broken: false,
        });
        self.decoding.push(read.flow);
        self.stopped.insert(
            read.pid,
            StoppedBackend {
                pid: read.pid,
                flow: Some(read.flow),
                waiting: Vec::new(),
                socket,
                withdrawing: false,
            },
        );
    }

    /// The messages of a stopped read, decoded: decide each, then resume
    /// the backend unless one waits for reviewers.
    pub(super) fn decide_stopped(&mut self, flow: Flow, messages: Vec<ClientMessage>) {
        let Some(c) = self.conns.get_mut(&flow) else {
            return;
        };
        let (read, broken) = match c.read.take() {
            Some(BackendRead::Decoding { read, broken }) => (read, broken),
            other => {
                c.read = other;
                return;
            }
        };
        if broken {
            // What the backend is about to parse was not decoded whole (lost
            // bytes, or not the protocol): nothing judged may run. End it.
            self.stopped.remove(&read.pid);
            self.terminate_unseen(
                read.pid,
                "its statement could not be decoded whole (capture loss or malformed bytes)",
            );
            self.resume(read.pid);
            return;
        }
        let needs_catalog = messages.iter().any(|m| {
            m.sql
                .as_ref()
                .is_some_and(|s| s.carrier != SqlCarrier::Startup)
        });
        if needs_catalog && self.catalog_pending(&flow) {
            // The backend stays stopped until its database's catalog is read.
            self.record(flow).read = Some(BackendRead::Deferred { read, messages });
            return;
        }
        let mut messages = messages.into_iter();
        while let Some(m) = messages.next() {
            let original = m.clone();
            let Some(sql) = m.sql else {
                continue;
            };
            let end = m.span.offset + m.span.len;
            if end <= read.start || end > read.end {
                continue;
            }
            let Some(rewrite) = locate(&read, m.span.offset, end, &sql) else {
                continue;
            };
            let pending = PendingSql {
                start: 0,
                end: 0,
                text_start: 0,
                text_end: 0,
                info: SqlInfo {
                    conn: m.conn,
                    carrier: sql.carrier,
                    text: sql.text.clone(),
                    hook: Some(HookHold {
                        backend_pid: read.pid,
                        resume: serde_json::to_string(&rewrite).unwrap_or_default(),
                    }),
                },
                request: None,
                incomplete: false,
                tail: false,
            };
            match self.decide(&flow, &pending) {
                Outcome::Allow => {}
                Outcome::Defer => {
                    // The backend stays stopped; this message and those after
                    // it are decided when the estimate arrives.
                    let messages: Vec<ClientMessage> =
                        std::iter::once(original).chain(messages).collect();
                    self.record(flow).read = Some(BackendRead::Deferred { read, messages });
                    return;
                }
                Outcome::Deny { id, reason } => {
                    self.refuse_in_backend(read.pid, &rewrite, &sql.text, id, &reason)
                }
                Outcome::Wait { id, schema } => {
                    self.awaited.insert(
                        id,
                        Awaited {
                            holder: Holder::Backend(read.pid),
                            schema,
                        },
                    );
                    if let Some(b) = self.stopped.get_mut(&read.pid) {
                        b.waiting.push(Waiting {
                            request: id,
                            rewrite,
                            text: sql.text,
                        });
                    }
                }
            }
        }
        self.resume_if_done(read.pid);
    }

    /// A request of a stopped backend reached its final state.
    pub(super) fn backend_request_final(
        &mut self,
        pid: u32,
        request: i64,
        approved: bool,
        reason: &str,
    ) {
        let Some(b) = self.stopped.get_mut(&pid) else {
            return;
        };
        let Some(i) = b.waiting.iter().position(|w| w.request == request) else {
            return;
        };
        let w = b.waiting.remove(i);
        if !approved {
            self.refuse_in_backend(
                pid,
                &w.rewrite,
                &w.text,
                DenialRef::Request(request),
                reason,
            );
        }
        self.resume_if_done(pid);
    }

    fn resume_if_done(&mut self, pid: u32) {
        if self
            .stopped
            .get(&pid)
            .is_some_and(|b| !b.waiting.is_empty())
        {
            return;
        }
        if let Some(b) = self.stopped.remove(&pid) {
            self.resume(b.pid);
        }
    }

    fn resume(&mut self, pid: u32) {
        self.kernel.backend_resumed(pid);
        // SAFETY: kill(2) with a plain signal number.
        if unsafe { libc::kill(pid as i32, libc::SIGCONT) } != 0 {
            warn!(
                pid,
                "resuming the backend: {}",
                std::io::Error::last_os_error()
            );
        }
        self.stats.backends_resumed += 1;
    }

    /// Rewrites a refused message in the stopped backend so the server
    /// answers with an error and runs nothing of it. Where no rewrite is
    /// possible the backend is terminated (the session ends; audited).
    fn refuse_in_backend(
        &mut self,
        pid: u32,
        r: &Rewrite,
        text: &str,
        id: DenialRef,
        reason: &str,
    ) {
        let result = match r.carrier {
            Carrier::Query | Carrier::Parse => {
                if r.whole && r.writable > 0 {
                    write_backend(
                        pid,
                        r.text_addr,
                        &rewrite::denial_text(r.writable, id, reason),
                    )
                } else {
                    let mut nonce = [0u8; 8];
                    let _ = getrandom::fill(&mut nonce);
                    match rewrite::tail_denial_text(r.writable, id, u64::from_le_bytes(nonce), text)
                    {
                        Some(tail) => write_backend(pid, r.text_addr, &tail),
                        // Too short a tail for a safe tag. A Query whose NUL
                        // is gone fails with "invalid string in message"; a
                        // Parse announcing 32 767 parameter types it does not
                        // carry fails with "insufficient data left in message".
                        None if r.carrier == Carrier::Query => write_backend(pid, r.end_addr, b"$"),
                        None => write_backend(pid, r.end_addr + 1, &0x7fffu16.to_be_bytes()),
                    }
                }
            }
            // An OID no function has: "function with OID 0 does not exist".
            Carrier::FunctionCall => match r.message_addr {
                Some(at) => write_backend(pid, at + 5, &[0; 4]),
                None => Err(std::io::Error::other("the function OID was read earlier")),
            },
            Carrier::Startup => match (
                r.message_addr,
                rewrite::startup_refusal(r.writable, id, reason),
            ) {
                (Some(at), Some(packet)) => write_backend(pid, at, &packet),
                _ => Err(std::io::Error::other(
                    "the startup packet is not whole in the buffer",
                )),
            },
            // The hook reads PostgreSQL backends only: terminated below.
            Carrier::Command => Err(std::io::Error::other(
                "a MySQL command in a PostgreSQL backend",
            )),
        };
        if let Err(e) = result {
            warn!(
                pid,
                denial = %id,
                "cannot rewrite the refused statement ({e}); terminating its backend"
            );
            // SAFETY: kill(2) with a plain signal number; SIGTERM is handled
            // by the backend on SIGCONT, before it parses anything.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            let details = serde_json::json!({
                "request": id.request(),
                "decision": id.decision(),
                "backend_pid": pid,
                "error": e.to_string(),
            });
            if let Err(e) = self.runtime.block_on(
                self.board
                    .audit(crate::store::audit::kinds::BACKEND_TERMINATED, details),
            ) {
                warn!("auditing the terminated backend: {e}");
            }
        }
    }

    /// Withdraws everything a stopped backend waits on (client gone, or the
    /// statement cancelled: PostgreSQL would lose the cancel).
    pub(super) fn withdraw_backend(&mut self, pid: u32, why: &str) {
        let Some(b) = self.stopped.get_mut(&pid) else {
            return;
        };
        if b.withdrawing {
            return;
        }
        b.withdrawing = true;
        let ids: Vec<i64> = b.waiting.iter().map(|w| w.request).collect();
        for id in ids {
            if let Err(e) = self.runtime.block_on(self.board.withdraw(id, why)) {
                warn!("withdrawing request {id}: {e}");
            }
        }
    }

    /// A backend that was connected before its server became gated: the
    /// read it is blocked in returns unseen by the hook. Over a Unix socket
    /// nothing else can see that statement, so the session is ended now;
    /// over TCP the tc programs gate it (the port keeps its older
    /// connections), unless it turns out to be TLS, which they cannot read:
    /// then it is ended as soon as that is known ([`Self::wire_encrypted`]).
    pub fn session_before_hook(&mut self, pid: u32, socket: ClientSocket) {
        match socket {
            ClientSocket::Unix => self.terminate_unseen(
                pid,
                "connected over a Unix socket before qgate's server hook: its next statement could not be seen",
            ),
            ClientSocket::Tcp(flow) => {
                self.record(flow).before_hook = Some(pid);
            }
        }
    }

    /// The wire stage found a connection encrypted: if it is one of those
    /// connected before the hook, nothing can read it: end it.
    pub(super) fn wire_encrypted(&mut self, flow: &Flow) {
        let before_hook = self.conns.get_mut(flow).and_then(|c| c.before_hook.take());
        self.tidy(flow);
        if let Some(pid) = before_hook {
            self.terminate_unseen(
                pid,
                "a TLS session connected before qgate's server hook: its next statement could not be seen",
            );
        }
    }

    fn terminate_unseen(&mut self, pid: u32, why: &str) {
        warn!(pid, "{why}: terminating the session");
        // SAFETY: kill(2) with a plain signal number.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        self.audit_termination(pid, why);
    }

    /// A backend the server hook terminated because its session probes
    /// could not be attached, or could no longer see all it reads (`why`).
    pub fn unprobed_backend_terminated(&mut self, pid: u32, why: &str) {
        self.audit_termination(
            pid,
            &format!("qgate's server hook could not read this session: {why}"),
        );
    }

    fn audit_termination(&mut self, pid: u32, why: &str) {
        let details = serde_json::json!({ "backend_pid": pid, "why": why });
        if let Err(e) = self.runtime.block_on(
            self.board
                .audit(crate::store::audit::kinds::BACKEND_TERMINATED, details),
        ) {
            warn!("auditing the terminated backend: {e}");
        }
    }

    /// The tc programs follow this session (it started before the hook): the
    /// hook lets go of the backend, resuming it if it stopped it.
    pub fn disown_backend(&mut self, pid: u32, stopped: bool) {
        self.kernel.ignore_backend(pid);
        if stopped {
            self.resume(pid);
        }
    }

    /// Backends the program stopped whose record never reached the agent
    /// (the ring was full): twice in a row unknown, they are ended rather
    /// than left stopped forever (their statement was never seen).
    pub fn reap_orphan_stops(&mut self) {
        let known: std::collections::HashSet<u32> = self
            .stopped
            .keys()
            .copied()
            .chain(
                self.conns
                    .values()
                    .filter_map(|c| c.read.as_ref().map(BackendRead::pid)),
            )
            .collect();
        // The same stop (same pid, stopped at the same read position) twice:
        // a backend stopped anew since the last look is not an orphan yet.
        let unknown: std::collections::HashSet<(u32, u64)> = self
            .kernel
            .stopped_backends()
            .into_iter()
            .filter(|(pid, _)| !known.contains(pid))
            .collect();
        let orphans: Vec<u32> = unknown
            .intersection(&self.orphan_suspects)
            .map(|(pid, _)| *pid)
            .collect();
        for pid in orphans {
            self.terminate_unseen(pid, "stopped for a statement whose record was lost");
            self.resume(pid);
        }
        self.orphan_suspects = unknown;
    }

    /// The stopped backend of a wire-stage connection, if any.
    pub(super) fn stopped_pid(&self, flow: &Flow) -> Option<u32> {
        self.stopped
            .values()
            .find(|b| b.flow.as_ref() == Some(flow))
            .map(|b| b.pid)
    }

    /// Periodic look at stopped backends: hung-up clients, pending cancels,
    /// vanished processes.
    pub(super) fn watch_stopped(&mut self) {
        let mut withdraw = Vec::new();
        let mut gone = Vec::new();
        for b in self.stopped.values() {
            if b.waiting.is_empty() || b.withdrawing {
                continue;
            }
            match pending_signals(b.pid) {
                None => gone.push(b.pid),
                Some(sigs) if sigs & CANCEL_SIGNALS != 0 => withdraw.push((
                    b.pid,
                    "cancelled on the server (pg_cancel_backend or pg_terminate_backend)",
                )),
                Some(_) => {
                    if b.socket.as_ref().is_some_and(hung_up) {
                        withdraw.push((b.pid, "the client disconnected"));
                    }
                }
            }
        }
        for (pid, why) in withdraw {
            info!(pid, "{why}: withdrawing its held statement");
            self.withdraw_backend(pid, why);
        }
        for pid in gone {
            if let Some(b) = self.stopped.remove(&pid) {
                for w in b.waiting {
                    let _ = self
                        .runtime
                        .block_on(self.board.withdraw(w.request, "the backend exited"));
                }
            }
        }
    }

    /// After a restart: stopped backends waiting on pending requests are
    /// taken over. Stopped ones with no request are decided from their
    /// record, still in the pinned ring; if none comes, the orphan reaper
    /// ends them ([`Self::reap_orphan_stops`]).
    pub(super) fn recover_backends(&mut self, pending: &[crate::store::requests::Request]) {
        for request in pending {
            let (Some(pid), Some(resume)) = (request.backend_pid, request.resume.as_deref()) else {
                continue;
            };
            let Ok(rewrite) = serde_json::from_str::<Rewrite>(resume) else {
                warn!(
                    request = request.id,
                    "unreadable resume data of a held statement"
                );
                continue;
            };
            if pending_signals(pid).is_none() {
                let _ = self
                    .runtime
                    .block_on(self.board.withdraw(request.id, "the backend exited"));
                continue;
            }
            self.awaited.insert(
                request.id,
                Awaited {
                    holder: Holder::Backend(pid),
                    schema: None,
                },
            );
            self.stopped
                .entry(pid)
                .or_insert_with(|| StoppedBackend {
                    pid,
                    flow: None,
                    waiting: Vec::new(),
                    socket: rewrite.socket_fd.and_then(|fd| duplicate_socket(pid, fd)),
                    withdrawing: false,
                })
                .waiting
                .push(Waiting {
                    request: request.id,
                    rewrite,
                    text: request.statement.clone(),
                });
            info!(
                request = request.id,
                pid, "took over a backend held before the restart"
            );
        }
    }
}

/// Where a message of a stopped read lies in the backend's buffer.
fn locate(
    read: &StoppedRead,
    start: u64,
    end: u64,
    sql: &crate::wire::ClientSql,
) -> Option<Rewrite> {
    let addr = |offset: u64| read.addr + (offset - read.start);
    let text_start = sql.text_span.offset;
    let text_end = text_start + sql.text_span.len;
    let (writable_from, whole) = if text_start >= read.start {
        (text_start, true)
    } else {
        (read.start, false)
    };
    Some(Rewrite {
        carrier: sql.carrier.into(),
        message_addr: (start >= read.start).then(|| addr(start)),
        text_addr: addr(writable_from.min(text_end).max(read.start)),
        writable: text_end.saturating_sub(writable_from) as usize,
        whole,
        end_addr: addr(text_end.min(end.saturating_sub(1)).max(read.start)),
        socket_fd: read.socket_fd,
    })
}

fn write_backend(pid: u32, addr: u64, bytes: &[u8]) -> std::io::Result<()> {
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))?;
    mem.write_all_at(bytes, addr)
}

/// SigPnd | ShdPnd of `/proc/PID/status`; `None` when the process is gone.
fn pending_signals(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut mask = 0;
    for line in status.lines() {
        if let Some(hex) = line
            .strip_prefix("SigPnd:")
            .or_else(|| line.strip_prefix("ShdPnd:"))
        {
            mask |= u64::from_str_radix(hex.trim(), 16).unwrap_or(0);
        }
    }
    Some(mask)
}

/// A copy of the backend's client socket (`pidfd_getfd(2)`), only ever
/// polled for a hang-up: nothing is read from it.
fn duplicate_socket(pid: u32, fd: i32) -> Option<OwnedFd> {
    // SAFETY: plain syscalls; the descriptors returned are ours to own.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0);
        if pidfd < 0 {
            return None;
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let sock = libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            fd,
            0,
        );
        (sock >= 0).then(|| OwnedFd::from_raw_fd(sock as i32))
    }
}

fn hung_up(socket: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(socket),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    rc > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}
