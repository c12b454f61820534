//! Following the server hook's records: which backends are the gate's
//! (their postmaster serves a gated port), which are left to the tc
//! programs (connected before the hook) or to nobody (another server),
//! and servers that start while the agent runs.
use std::{collections::HashSet, time::Duration, time::Instant};

use tracing::warn;

use crate::{
    capture::{
        backend::{BackendStep, BackendStreams, PortInfo},
        hook::{existing_backends, postmaster_of, HookKind, HookRecord, Postmaster},
        kernel::KernelCapture,
    },
    config::Config,
    flow::{Flow, Transport},
    gate::Gate,
    pipeline::Pipeline,
    wire::{Tracker, WireEvent},
};

/// After a postmaster starts, how long and how often to look for it.
const RESCAN_BURST: Duration = Duration::from_secs(10);
const RESCAN_BURST_EVERY: Duration = Duration::from_millis(20);

/// What the loop remembers of the server hook's backends and servers.
pub(super) struct HookFollow {
    backends: BackendStreams,
    /// Backends of servers this agent does not gate, met before it knew.
    disowned: HashSet<u32>,
    /// A backend of a server not registered yet was claimed: look now.
    rescan_now: bool,
    /// A postmaster started: look often until then.
    rescan_burst_until: Instant,
    last_scan: Instant,
}

impl HookFollow {
    pub(super) fn new(backends: BackendStreams) -> Self {
        HookFollow {
            backends,
            disowned: HashSet::new(),
            rescan_now: false,
            rescan_burst_until: Instant::now(),
            last_scan: Instant::now(),
        }
    }

    /// One record of the server hook.
    pub(super) fn on_record(
        &mut self,
        record: HookRecord,
        ports: &[u16],
        gate: &mut Gate,
        pipeline: &mut Pipeline,
    ) {
        let (pid, stopped) = (record.pid, record.stopped);
        if self.disowned.contains(&pid) {
            // Not one of ours: records already on their way.
            if stopped {
                gate.disown_backend(pid, true);
            }
            if record.kind == HookKind::Exited {
                self.disowned.remove(&pid);
            }
            return;
        }
        if record.kind == HookKind::PostmasterStarted {
            // Look at once and for a while: its postmaster.pid is written a
            // moment after PostmasterMain begins.
            self.rescan_burst_until = Instant::now() + RESCAN_BURST;
            return;
        }
        if record.candidate {
            if postmaster_of(pid, ports).is_some() {
                // A server started since the last look: hold its backend
                // from now on, register the server next.
                if let Err(e) = gate.kernel().claim_backend(pid) {
                    warn!(pid, "claiming a backend: {e}");
                }
                self.rescan_now = true;
            } else {
                self.disowned.insert(pid);
                gate.disown_backend(pid, stopped);
                return;
            }
        }
        let steps = self.backends.steps(record, read_backend_port);
        if followed_on_the_wire(&steps, pipeline.tracker()) {
            self.backends.disown(pid);
            gate.disown_backend(pid, stopped);
            return;
        }
        for step in steps {
            on_backend_step(step, gate, pipeline);
        }
    }

    /// Looks for PostgreSQL servers on the gated ports when due: every
    /// `server_hook.rescan_ms`, often after a postmaster started, at once
    /// after a backend of an unknown server was claimed.
    pub(super) fn rescan_if_due(
        &mut self,
        capture: &mut KernelCapture,
        config: &Config,
        gate: &mut Gate,
    ) {
        let every = if Instant::now() < self.rescan_burst_until {
            RESCAN_BURST_EVERY
        } else {
            Duration::from_millis(config.server_hook.rescan_ms)
        };
        if !self.rescan_now && self.last_scan.elapsed() < every {
            return;
        }
        self.last_scan = Instant::now();
        self.rescan_now = false;
        let fresh = capture.discover_servers(&config.capture.ports);
        if !fresh.is_empty() {
            gate.kernel().forget_ignored_backends();
        }
        for pm in fresh {
            take_over_sessions(gate, &pm, |pid| self.backends.flow_of(pid).is_some());
        }
    }
}

/// One server hook step through the same stages as a wire segment.
fn on_backend_step(step: BackendStep, gate: &mut Gate, pipeline: &mut Pipeline) {
    match step {
        BackendStep::Hooked {
            flow,
            pid,
            transport,
            client,
            server,
        } => {
            gate.hooked_session(flow, pid, client, server, transport);
            if let Some(conn) = pipeline.tracker().connection_id(&flow) {
                pipeline.writer().send(WireEvent::ServerHooked {
                    conn,
                    transport,
                    backend_pid: pid,
                    client,
                    server,
                });
            }
        }
        BackendStep::Stopped(read) => gate.backend_stopped(&read, pipeline.tracker_mut()),
        BackendStep::Segment(seg) => {
            pipeline.on_segment(&seg, |tracker, event| gate.on_event(tracker, event));
            gate.after_segment(pipeline.tracker_mut());
        }
        BackendStep::Exited { pid, flow } => gate.backend_exited(pid, flow),
    }
}

/// A session the hook first meets mid-stream that the tc programs already
/// follow in plain (it started before its server became gated).
fn followed_on_the_wire(steps: &[BackendStep], tracker: &Tracker) -> bool {
    steps.iter().any(|s| match s {
        BackendStep::Hooked {
            transport: Transport::Unknown,
            client: Some(client),
            server: Some(server),
            ..
        } => tracker
            .connection_id(&Flow {
                client: *client,
                server: *server,
            })
            .is_some_and(|conn| !tracker.is_encrypted(conn)),
        _ => false,
    })
}

/// A server just became gated: its sessions from before (but those the
/// hook already `follows` from their start, or whose reads the kernel's
/// probes have followed: a restarted agent's predecessor's) are either left
/// to the wire path or ended (see `Gate::session_before_hook`).
pub(super) fn take_over_sessions(gate: &mut Gate, pm: &Postmaster, follows: impl Fn(u32) -> bool) {
    for (pid, socket) in existing_backends(pm.pid) {
        if !follows(pid) && !gate.kernel().hook_follows(pid) {
            gate.session_before_hook(pid, socket);
        }
    }
}

/// The `Port` of a backend this agent first meets mid-session.
fn read_backend_port(pid: u32, port: u64) -> Option<PortInfo> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut buf = vec![0u8; qgate_common::hook::PORT_PREFIX];
    mem.read_exact_at(&mut buf, port).ok()?;
    PortInfo::parse(&buf)
}
