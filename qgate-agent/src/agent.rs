//! `qgate-agent run`: the live pipeline, the API and the kernel side, wired
//! together and kept alive until SIGINT/SIGTERM.
//!
//! Threads: the hot loop (ring buffer → wire → gate) runs on the calling
//! thread; the store writer has its own; the API, request expiry, webhooks
//! and signal handling run on a small tokio runtime.
use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::{
    api::{self, ApiOptions, AppState, ServeOptions},
    capture::{
        backend::{BackendStep, BackendStreams, PortInfo},
        hook::{existing_backends, postmaster_of, HookKind, Postmaster},
        kernel::{pin_dir, CaptureError, Captured, KernelCapture},
    },
    catalog::{self, Catalogs},
    config::{Config, FailMode, GateSetting, Unreadable},
    flow::{Flow, GateMode, Transport},
    gate::{inject::Injector, Gate},
    pipeline::Pipeline,
    policy::{self, Policy, PolicyHandle, Subject},
    store::{self, Store, Writer, WriterConfig},
    wire::{Tracker, WireEvent},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("store {path}: {source}")]
    Store {
        path: PathBuf,
        source: store::StoreError,
    },
    #[error("API: {0}")]
    Api(String),
    #[error("gate: {0}")]
    Gate(String),
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("policy: {0}")]
    Policy(#[from] policy::PolicyError),
}

/// After a postmaster starts, how long and how often to look for it.
const RESCAN_BURST: Duration = Duration::from_secs(10);
const RESCAN_BURST_EVERY: Duration = Duration::from_millis(20);

/// How often the agent tells the kernel it is alive and reads its counters.
const HEARTBEAT: Duration = Duration::from_millis(250);

/// Signals the agent reacts to, as flags the hot loop reads.
pub struct Signals {
    /// SIGINT/SIGTERM: stop.
    pub stop: Arc<AtomicBool>,
    /// SIGHUP: reload the policy file.
    pub reload: Arc<AtomicBool>,
}

/// Runs until `signals.stop` is set.
pub fn run(config: &Config, interfaces: &[String], signals: Signals) -> Result<(), AgentError> {
    let Signals { stop, reload } = signals;
    // Before any thread exists: every thread inherits it.
    set_nice(config.capture.nice);
    let store_err = |source| AgentError::Store {
        path: config.store.path.clone(),
        source,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("qgate-async")
        .build()
        .map_err(AgentError::Runtime)?;

    let store = Store::open(&config.store.path).map_err(store_err)?;
    let writer = Writer::spawn(
        store,
        WriterConfig {
            publish_head: true,
            ..WriterConfig::default()
        },
    )
    .map_err(store_err)?;
    let mut pipeline = Pipeline::new(writer);
    let stream = if config.audit_stream.enabled() {
        Some(
            store::stream::StreamThread::spawn(&config.store.path, &config.audit_stream)
                .map_err(AgentError::Gate)?,
        )
    } else {
        None
    };

    api::metrics::install();
    let mut webhooks = api::webhook::WebhookOptions {
        urls: config.webhooks.urls.clone(),
        slack_urls: config.webhooks.slack_urls.clone(),
        inbox_url: Some(config.webhooks.inbox_url.clone().unwrap_or_else(|| {
            let scheme = if config.api.tls_cert.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{}/ui/", config.api.listen)
        })),
        ..Default::default()
    };
    if let Some(path) = &config.webhooks.secret_file {
        let secret = std::fs::read_to_string(path).map_err(|e| {
            AgentError::Api(format!("webhooks.secret_file {}: {e}", path.display()))
        })?;
        webhooks.secret = Some(secret.trim().to_owned());
    }
    if let Some(n) = config.webhooks.max_attempts {
        webhooks.max_attempts = n.max(1);
    }
    if let Some(ms) = config.webhooks.timeout_ms {
        webhooks.timeout = Duration::from_millis(ms.max(1));
    }
    let state = AppState::open(
        &config.store.path,
        ApiOptions {
            hold_timeout: Duration::from_secs(config.gate.hold_timeout_s),
            webhooks,
            ..ApiOptions::default()
        },
    )
    .map_err(|e| AgentError::Api(e.to_string()))?;
    let board = state.board().clone();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(config.api.listen))
        .map_err(|e| AgentError::Api(format!("binding {}: {e}", config.api.listen)))?;
    let api_stop = Arc::new(tokio::sync::Notify::new());
    let api_task = {
        let api_stop = api_stop.clone();
        runtime.spawn(api::serve(
            listener,
            state,
            ServeOptions {
                tls: match (&config.api.tls_cert, &config.api.tls_key) {
                    (Some(cert), Some(key)) => Some(api::TlsFiles {
                        cert: cert.clone(),
                        key: key.clone(),
                    }),
                    _ => None,
                },
                allow_plaintext_remote: config.api.allow_plaintext_remote,
            },
            async move { api_stop.notified().await },
        ))
    };
    info!(listen = %config.api.listen, "API listening");

    let policy = PolicyHandle::new(Policy::builtin_default())
        .with_estimator(config.policy.estimator.is_some());
    if let Some(path) = &config.policy.file {
        // As a reload would: every warning logged, the first error refuses.
        policy.reload_from(path)?;
    }
    policy
        .current()
        .check_estimator(config.policy.estimator.is_some())?;
    let _watcher = match &config.policy.file {
        Some(path) => Some(
            policy::watch_file(policy.clone(), path.clone(), Duration::from_secs(1))
                .map_err(|e| AgentError::Gate(format!("watching {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let enforcing = config.gate.mode == GateSetting::Policy;
    let pins = pin_dir(&config.gate.pin_dir);
    let mut capture = KernelCapture::attach(interfaces, &config.capture.ports, &pins)?;
    let mut kernel = capture.take_gate()?;
    let mut backends = BackendStreams::new(capture.clock_offset());
    let mut servers_before_gate = Vec::new();
    if config.server_hook.enabled {
        capture.enable_server_hook()?;
        let fresh = capture.discover_servers(&config.capture.ports);
        if !fresh.is_empty() {
            kernel.forget_ignored_backends();
        }
        servers_before_gate = fresh;
        if capture.hooked_servers().is_empty() {
            warn!(ports = ?config.capture.ports, "server hook: no PostgreSQL server found on these ports yet; looking again every {} ms", config.server_hook.rescan_ms);
        }
    }
    let default_mode = configure_kernel(&mut kernel, config, &policy, enforcing)?;
    let injector = Injector::new().map_err(|e| AgentError::Gate(e.to_string()))?;
    let mut events = board.subscribe();
    // A reviewer's decision wakes the loop at once instead of at its next
    // 10 ms look: an eventfd the poll waits on, written on every event.
    let decisions = DecisionBell::ring_on(board.subscribe(), runtime.handle())
        .map_err(|e| AgentError::Gate(format!("decision wake-up: {e}")))?;
    let (estimator, estimates) = config
        .policy
        .gate_estimator(decisions.waker())
        .map_err(|e| AgentError::Gate(format!("policy.estimator: {e}")))?;
    let mut estimate_generation = 0;
    let mut gate = Gate::new(
        kernel,
        injector,
        policy.clone(),
        estimator,
        board.clone(),
        runtime.handle().clone(),
        enforcing,
    );
    for pm in servers_before_gate {
        take_over_sessions(&mut gate, &pm, |_| false);
    }
    let catalogs = (enforcing && config.catalog.enabled).then(|| {
        let catalogs = Catalogs::start(decisions.waker());
        catalogs.set_server(catalog_server(&config.capture.ports));
        gate.use_catalogs(catalogs.clone());
        catalogs
    });
    let mut catalog_generation = 0;
    gate.refuse_encrypted_sessions(enforcing && config.gate.unreadable == Unreadable::Refuse);
    gate.set_recovery_grace(Duration::from_secs(config.gate.recovery_grace_s));
    let recovered = gate.recover();
    if recovered > 0 {
        info!(
            requests = recovered,
            "pending requests from before the restart: waiting for their statements"
        );
    }
    audit_agent_event(
        &runtime,
        &board,
        crate::store::audit::kinds::AGENT_START,
        serde_json::json!({
            "interfaces": interfaces,
            "ports": config.capture.ports,
            "mode": format!("{default_mode:?}"),
            "policy": policy.source(),
        }),
    );
    info!(?interfaces, ports = ?config.capture.ports, mode = ?default_mode, "capturing");

    let mut policy_generation = policy.generation();
    let mut last_beat = Instant::now();
    let mut last_scan = Instant::now();
    let mut last_catalog_look = Instant::now();
    // Backends of servers this agent does not gate, met before it knew.
    let mut disowned = std::collections::HashSet::new();
    let mut rescan_now = false;
    let mut rescan_burst_until = Instant::now();
    let mut losses = LossWatch::default();
    // After SIGTERM one more pass, without waiting: what the rings hold at
    // that moment is read and stored, not dropped uncounted with the maps.
    let mut last_pass = false;
    loop {
        if stop.load(Ordering::Relaxed) {
            if last_pass {
                break;
            }
            last_pass = true;
        }
        // Ordinary ring records wake nobody (qgate-ebpf's ring.rs): this
        // timeout is how often they are drained. Held statements, stopped
        // backends and reviewers' decisions (the eventfd) wake the loop.
        capture.poll(
            if last_pass {
                Duration::ZERO
            } else {
                crate::capture::DRAIN_EVERY
            },
            Some(decisions.fd()),
            |item| match item {
                Captured::Segment(seg) => {
                    gate.before_segment(&seg, pipeline.tracker_mut());
                    pipeline.on_segment(&seg, |tracker, event| gate.on_event(tracker, event));
                    gate.after_segment(pipeline.tracker_mut());
                }
                Captured::Hook(record) => {
                    let (pid, stopped) = (record.pid, record.stopped);
                    if disowned.contains(&pid) {
                        // Not one of ours: records already on their way.
                        if stopped {
                            gate.disown_backend(pid, true);
                        }
                        if record.kind == HookKind::Exited {
                            disowned.remove(&pid);
                        }
                        return;
                    }
                    if record.kind == HookKind::PostmasterStarted {
                        // Look at once and for a while: its postmaster.pid is
                        // written a moment after PostmasterMain begins.
                        rescan_burst_until = Instant::now() + RESCAN_BURST;
                        return;
                    }
                    if record.candidate {
                        if postmaster_of(pid, &config.capture.ports).is_some() {
                            // A server started since the last look: hold its
                            // backend from now on, register the server next.
                            if let Err(e) = gate.kernel().claim_backend(pid) {
                                warn!(pid, "claiming a backend: {e}");
                            }
                            rescan_now = true;
                        } else {
                            disowned.insert(pid);
                            gate.disown_backend(pid, stopped);
                            return;
                        }
                    }
                    let steps = backends.steps(record, read_backend_port);
                    if followed_on_the_wire(&steps, pipeline.tracker()) {
                        backends.disown(pid);
                        gate.disown_backend(pid, stopped);
                        return;
                    }
                    for step in steps {
                        on_backend_step(step, &mut gate, &mut pipeline);
                    }
                }
            },
        )?;
        let rescan_every = if Instant::now() < rescan_burst_until {
            RESCAN_BURST_EVERY
        } else {
            Duration::from_millis(config.server_hook.rescan_ms)
        };
        if config.server_hook.enabled && (rescan_now || last_scan.elapsed() >= rescan_every) {
            last_scan = Instant::now();
            rescan_now = false;
            let fresh = capture.discover_servers(&config.capture.ports);
            if !fresh.is_empty() {
                gate.kernel().forget_ignored_backends();
            }
            for pm in fresh {
                take_over_sessions(&mut gate, &pm, |pid| backends.flow_of(pid).is_some());
            }
        }
        if let Some(estimates) = &estimates {
            // An estimate arrived: what waited for it is decided (below, or
            // with a catalog read that ended too).
            let generation = estimates.load(Ordering::Acquire);
            if generation != estimate_generation {
                estimate_generation = generation;
                gate.catalogs_changed(pipeline.tracker_mut());
            }
        }
        if let Some(catalogs) = &catalogs {
            if last_catalog_look.elapsed() >= CATALOG_SERVER_LOOK {
                last_catalog_look = Instant::now();
                catalogs.set_server(catalog_server(&config.capture.ports));
            }
            let generation = catalogs.generation();
            if generation != catalog_generation {
                catalog_generation = generation;
                gate.catalogs_changed(pipeline.tracker_mut());
            }
        }
        decisions.quiet();
        loop {
            match events.try_recv() {
                Ok(event) => gate.on_request_event(&event, pipeline.tracker_mut()),
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => {
                    warn!("missed {n} request events; decisions arrive with the next ones");
                }
                Err(_) => break,
            }
        }
        gate.tick(pipeline.tracker_mut());
        if reload.swap(false, Ordering::Relaxed) {
            reload_policy(config, &policy);
        }
        if policy.generation() != policy_generation {
            // Reloaded (SIGHUP or the file changed): new modes from now on.
            policy_generation = policy.generation();
            configure_kernel(gate.kernel(), config, &policy, enforcing)?;
            gate.refresh_modes();
            audit_agent_event(
                &runtime,
                &board,
                crate::store::audit::kinds::POLICY_RELOAD,
                serde_json::json!({ "generation": policy_generation, "policy": policy.source() }),
            );
        }
        if last_beat.elapsed() >= HEARTBEAT {
            last_beat = Instant::now();
            if let Err(e) = gate.kernel().heartbeat() {
                warn!("heartbeat: {e}");
            }
            gate.reap_orphan_stops();
            let counters = capture.counters();
            losses.check(&counters, &pipeline, |kind, details| {
                audit_agent_event(&runtime, &board, kind, details)
            });
            pipeline.tick(crate::clock::now());
        }
        for decided in gate.take_decided() {
            pipeline.writer().decided(decided);
        }
        pipeline.push();
    }

    info!("stopping");
    let counters = capture.counters();
    pipeline
        .writer()
        .record_capture_loss(crate::clock::now(), counters);
    let (summary, stats) = pipeline.finish(crate::clock::now()).map_err(store_err)?;
    info!(?summary, ?stats, "store flushed");
    audit_agent_event(
        &runtime,
        &board,
        crate::store::audit::kinds::AGENT_STOP,
        serde_json::json!({ "summary": summary, "gate": gate.stats() }),
    );
    if let Some(stream) = stream {
        stream.finish();
    }
    if gate.holding() == 0 {
        capture.unpin();
    } else {
        // The kernel keeps holding; the next agent picks the holds up.
        info!(
            connections = gate.holding(),
            "statements still held: pins kept for the next agent"
        );
    }
    api_stop.notify_one();
    let _ = runtime.block_on(api_task);
    Ok(())
}

/// What the kernel counted or the agent shed since the last look: logged,
/// audited and recorded each heartbeat, so no loss or fail-open is silent.
#[derive(Default)]
struct LossWatch {
    lost: u64,
    failed_open: u64,
    refused: u64,
    shed: u64,
    dropped: u64,
}

impl LossWatch {
    fn check(
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

/// Sets this thread's niceness (threads started later inherit it). A
/// failure (no CAP_SYS_NICE) is logged, not fatal: the agent still works.
fn set_nice(nice: i32) {
    // SAFETY: plain setpriority(2) on the calling thread (who = 0).
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc != 0 {
        warn!(
            nice,
            "setting the agent's niceness: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// How often the agent looks for the server whose catalogs it reads.
const CATALOG_SERVER_LOOK: Duration = Duration::from_secs(2);

/// The gated PostgreSQL server whose catalogs the gate reads: the first
/// postmaster (by port order in the configuration) in this network namespace.
fn catalog_server(ports: &[u16]) -> Option<catalog::load::Server> {
    let mut postmasters = crate::capture::hook::find_postmasters(ports);
    postmasters.sort_by_key(|pm| ports.iter().position(|p| *p == pm.port));
    let pm = postmasters.first()?;
    match catalog::load::Server::of_postmaster(pm.pid, &pm.data_dir, pm.port) {
        Ok(server) => Some(server),
        Err(e) => {
            warn!(pid = pm.pid, "catalog reader: {e}");
            None
        }
    }
}

/// An eventfd that becomes readable whenever a request event is published.
struct DecisionBell {
    fd: std::sync::Arc<std::os::fd::OwnedFd>,
}

impl DecisionBell {
    fn ring_on(
        mut events: tokio::sync::broadcast::Receiver<crate::api::RequestEvent>,
        runtime: &tokio::runtime::Handle,
    ) -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain eventfd(2); the descriptor is owned right away.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = std::sync::Arc::new(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) });
        let writer = fd.clone();
        runtime.spawn(async move {
            use std::os::fd::AsRawFd;
            while !matches!(
                events.recv().await,
                Err(tokio::sync::broadcast::error::RecvError::Closed)
            ) {
                let one = 1u64.to_ne_bytes();
                // SAFETY: 8 bytes to an eventfd we keep alive through `writer`.
                unsafe { libc::write(writer.as_raw_fd(), one.as_ptr() as *const _, 8) };
            }
        });
        Ok(Self { fd })
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Rings the bell from elsewhere (the catalog reader's thread).
    fn waker(&self) -> Box<dyn Fn() + Send + Sync> {
        let fd = self.fd.clone();
        Box::new(move || {
            use std::os::fd::AsRawFd;
            let one = 1u64.to_ne_bytes();
            // SAFETY: 8 bytes to an eventfd kept alive by `fd`.
            unsafe { libc::write(fd.as_raw_fd(), one.as_ptr() as *const _, 8) };
        })
    }

    /// Resets the counter (the events themselves are read elsewhere).
    fn quiet(&self) {
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 8];
        // SAFETY: 8-byte buffer; non-blocking eventfd.
        unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr() as *mut _, 8) };
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
            gate.hooked_session(flow, pid, client, transport);
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
/// hook already `follows` from their start) are either left to the wire
/// path or ended (see `Gate::session_before_hook`).
fn take_over_sessions(gate: &mut Gate, pm: &Postmaster, follows: impl Fn(u32) -> bool) {
    for (pid, socket) in existing_backends(pm.pid) {
        if !follows(pid) {
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

/// SIGHUP: re-read the policy file; a broken file leaves the old policy in force.
fn reload_policy(config: &Config, policy: &PolicyHandle) {
    let Some(path) = &config.policy.file else {
        info!("SIGHUP: the built-in default policy is in force; nothing to reload");
        return;
    };
    match policy.reload_from(path) {
        Ok(()) => info!(path = %path.display(), "policy reloaded"),
        Err(e) => warn!(path = %path.display(), "policy reload refused, the old policy stays: {e}"),
    }
}

/// Writes the program's global settings from the configuration and the
/// policy in force; returns the mode of connections not judged yet.
fn configure_kernel(
    kernel: &mut crate::bpf::KernelGate,
    config: &Config,
    policy: &PolicyHandle,
    enforcing: bool,
) -> Result<GateMode, AgentError> {
    // A connection whose identity is not judged yet (or never: opened before
    // the agent) is gated as the policy treats an unknown identity.
    let default_mode = if enforcing {
        match policy::needs_gate(&policy.current(), &Subject::default()) {
            GateMode::Monitor => GateMode::Monitor,
            GateMode::GateRisky => GateMode::GateRisky,
            // Refused identities are judged per connection, once known.
            GateMode::GateAll | GateMode::Deny => GateMode::GateAll,
        }
    } else {
        GateMode::Monitor
    };
    kernel
        .configure(
            default_mode,
            config.gate.fail == FailMode::Open,
            Duration::from_millis(config.gate.fail_after_ms),
            // Every StartupMessage waits for the agent: its settings are
            // judged as SETs, and the policy may refuse the identity.
            enforcing,
            enforcing && config.gate.unreadable == Unreadable::Refuse,
        )
        .map_err(|e| AgentError::Gate(e.to_string()))?;
    Ok(default_mode)
}

/// Audits an event of the agent's own life (start, stop, reload, capture
/// trouble). A failed write is logged and counted by [`crate::api::RequestBoard::audit`]; the
/// agent keeps running (no statement's fate depends on these entries).
fn audit_agent_event(
    runtime: &tokio::runtime::Runtime,
    board: &crate::api::RequestBoard,
    kind: crate::store::audit::Kind,
    details: serde_json::Value,
) {
    if runtime.block_on(board.audit(kind, details)).is_err() {
        // Already logged and counted.
    }
}
