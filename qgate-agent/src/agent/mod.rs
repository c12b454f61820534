//! `qgate-agent run`: the live pipeline, the API and the kernel side, wired
//! together and kept alive until SIGINT/SIGTERM.
//!
//! Threads: the hot loop (ring buffer → wire → gate) runs on the calling
//! thread; the store writer has its own; the API, request expiry, webhooks
//! and signal handling run on a small tokio runtime.
//!
//! | module | does |
//! | --- | --- |
//! | `follow` | the server hook's records: backends followed, disowned, servers found |
//! | `losses` | capture losses and fail-open passes: logged, audited, recorded |
mod follow;
mod losses;

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tracing::{info, warn};

use self::losses::LossWatch;
use crate::{
    api::{self, ApiOptions, AppState, ServeOptions},
    board::{RequestBoard, RequestEvent},
    capture::{
        backend::BackendStreams,
        kernel::{pin_dir, CaptureError, Captured, KernelCapture},
    },
    catalog::{self, Catalogs},
    config::{Config, FailMode, GateSetting, Unreadable},
    flow::GateMode,
    gate::{inject::Injector, Gate},
    pipeline::Pipeline,
    policy::{self, Policy, PolicyHandle, PolicyWatcher, Subject},
    store::{self, Store, Writer, WriterConfig},
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
    // Before any thread exists: every thread inherits it.
    set_nice(config.capture.nice);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("qgate-async")
        .build()
        .map_err(AgentError::Runtime)?;
    let mut agent = Agent::start(config, interfaces, &runtime)?;
    // After SIGTERM one more pass, without waiting: what the rings hold at
    // that moment is read and stored, not dropped uncounted with the maps.
    while !signals.stop.load(Ordering::Relaxed) {
        agent.pass(crate::capture::DRAIN_EVERY, &signals.reload)?;
    }
    agent.pass(Duration::ZERO, &signals.reload)?;
    agent.stop()
}

/// The reviewers' API, served on the runtime until `stop` is notified.
struct Api {
    board: RequestBoard,
    stop: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<Result<(), api::ServeError>>,
}

impl Api {
    fn serve(config: &Config, runtime: &tokio::runtime::Runtime) -> Result<Api, AgentError> {
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
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = {
            let stop = stop.clone();
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
                async move { stop.notified().await },
            ))
        };
        info!(listen = %config.api.listen, "API listening");
        Ok(Api { board, stop, task })
    }
}

/// The policy in force, and the watch on its file.
fn load_policy(config: &Config) -> Result<(PolicyHandle, Option<PolicyWatcher>), AgentError> {
    let policy = PolicyHandle::new(Policy::builtin_default())
        .with_estimator(config.policy.estimator.is_some());
    if let Some(path) = &config.policy.file {
        // As a reload would: every warning logged, the first error refuses.
        policy.reload_from(path)?;
    }
    policy
        .current()
        .check_estimator(config.policy.estimator.is_some())?;
    let watcher = match &config.policy.file {
        Some(path) => Some(
            policy::watch_file(policy.clone(), path.clone(), Duration::from_secs(1))
                .map_err(|e| AgentError::Gate(format!("watching {}: {e}", path.display())))?,
        ),
        None => None,
    };
    Ok((policy, watcher))
}

/// Everything `run` keeps alive, and what the loop remembers between passes.
struct Agent<'a> {
    config: &'a Config,
    runtime: &'a tokio::runtime::Runtime,
    pipeline: Pipeline,
    stream: Option<store::stream::StreamThread>,
    api: Api,
    policy: PolicyHandle,
    _watcher: Option<PolicyWatcher>,
    enforcing: bool,
    capture: KernelCapture,
    follow: follow::HookFollow,
    gate: Gate,
    /// Reviewers' decisions wake the loop (an eventfd in its poll).
    decisions: DecisionBell,
    events: tokio::sync::broadcast::Receiver<RequestEvent>,
    catalogs: Option<Catalogs>,
    /// Bumped by the deferred estimator when an estimate arrives.
    estimates: Option<Arc<AtomicU64>>,
    /// The generations last acted on.
    seen: Generations,
    last_beat: Instant,
    last_catalog_look: Instant,
    losses: LossWatch,
}

/// Counters of things that changed elsewhere, as the loop last saw them.
#[derive(Default)]
struct Generations {
    policy: u64,
    catalog: u64,
    estimate: u64,
}

impl<'a> Agent<'a> {
    /// Opens the store, serves the API, loads the policy, attaches the
    /// programs and takes over what a previous agent left held.
    fn start(
        config: &'a Config,
        interfaces: &[String],
        runtime: &'a tokio::runtime::Runtime,
    ) -> Result<Self, AgentError> {
        let store_err = |source| AgentError::Store {
            path: config.store.path.clone(),
            source,
        };
        let store = Store::open(&config.store.path).map_err(store_err)?;
        let writer = Writer::spawn(
            store,
            WriterConfig {
                publish_head: true,
                behind_nice: Some(config.capture.nice),
                ..WriterConfig::default()
            },
        )
        .map_err(store_err)?;
        let mut pipeline = Pipeline::new(writer);
        pipeline
            .tracker_mut()
            .set_mysql_ports(&config.capture.mysql_ports);
        let stream = if config.audit_stream.enabled() {
            Some(
                store::stream::StreamThread::spawn(&config.store.path, &config.audit_stream)
                    .map_err(AgentError::Gate)?,
            )
        } else {
            None
        };
        let api = Api::serve(config, runtime)?;
        let (policy, watcher) = load_policy(config)?;
        let enforcing = config.gate.mode == GateSetting::Policy;
        let pins = pin_dir(&config.gate.pin_dir);
        let mut capture = KernelCapture::attach(
            interfaces,
            &config.capture.ports,
            &config.capture.mysql_ports,
            &pins,
        )?;
        let mut kernel = capture.take_gate()?;
        let follow = follow::HookFollow::new(BackendStreams::new(capture.clock_offset()));
        let mut servers_before_gate = Vec::new();
        if config.server_hook.enabled {
            capture.enable_server_hook(config.server_hook.probes)?;
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
        let events = api.board.subscribe();
        // A reviewer's decision wakes the loop at once instead of at its
        // next 10 ms look: an eventfd the poll waits on, written on every
        // event.
        let decisions = DecisionBell::ring_on(api.board.subscribe(), runtime.handle())
            .map_err(|e| AgentError::Gate(format!("decision wake-up: {e}")))?;
        let (estimator, estimates) = config
            .policy
            .gate_estimator(decisions.waker())
            .map_err(|e| AgentError::Gate(format!("policy.estimator: {e}")))?;
        let mut gate = Gate::new(
            kernel,
            injector,
            policy.clone(),
            estimator,
            api.board.clone(),
            runtime.handle().clone(),
            enforcing,
        );
        for pm in servers_before_gate {
            follow::take_over_sessions(&mut gate, &pm, |_| false);
        }
        let catalogs = (enforcing && config.catalog.enabled).then(|| {
            let catalogs = Catalogs::start(decisions.waker());
            catalogs.set_server(catalog_server(&config.capture.ports));
            catalogs.set_mysql_servers(mysql_servers(&config.capture.mysql_ports));
            gate.use_catalogs(catalogs.clone());
            catalogs
        });
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
            runtime,
            &api.board,
            crate::store::audit::kinds::AGENT_START,
            serde_json::json!({
                "interfaces": interfaces,
                "ports": config.capture.ports,
                "mode": format!("{default_mode:?}"),
                "policy": policy.source(),
            }),
        );
        info!(?interfaces, ports = ?config.capture.ports, mode = ?default_mode, "capturing");
        Ok(Agent {
            config,
            runtime,
            pipeline,
            stream,
            api,
            seen: Generations {
                policy: policy.generation(),
                ..Generations::default()
            },
            policy,
            _watcher: watcher,
            enforcing,
            capture,
            follow,
            gate,
            decisions,
            events,
            catalogs,
            estimates,
            last_beat: Instant::now(),
            last_catalog_look: Instant::now(),
            losses: LossWatch::default(),
        })
    }

    /// One pass: drain the rings (waiting up to `wait` for something that
    /// wakes the loop), then everything that is due.
    fn pass(&mut self, wait: Duration, reload: &AtomicBool) -> Result<(), AgentError> {
        let Agent {
            config,
            capture,
            gate,
            pipeline,
            follow,
            decisions,
            ..
        } = self;
        // Ordinary ring records wake nobody (qgate-ebpf's ring.rs): `wait`
        // is how often they are drained. Held statements, stopped backends
        // and reviewers' decisions (the eventfd) wake the loop.
        capture.poll(wait, Some(decisions.fd()), |item| match item {
            // Never reached the server: not part of the stream.
            Captured::Segment(seg) if seg.refused => gate.on_refused(&seg),
            Captured::Segment(seg) => {
                gate.before_segment(&seg, pipeline.tracker_mut());
                pipeline.on_segment(&seg, |tracker, event| gate.on_event(tracker, event));
                gate.after_segment(pipeline.tracker_mut());
            }
            Captured::Hook(record) => {
                follow.on_record(record, &config.capture.ports, gate, pipeline)
            }
        })?;
        if config.server_hook.enabled {
            follow.rescan_if_due(capture, config, gate);
            for (pid, why) in capture.hook_failures() {
                gate.unprobed_backend_terminated(pid, &why);
            }
        }
        self.fresh_facts();
        self.decisions.quiet();
        loop {
            match self.events.try_recv() {
                Ok(event) => self
                    .gate
                    .on_request_event(&event, self.pipeline.tracker_mut()),
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => {
                    warn!("missed {n} request events; decisions arrive with the next ones");
                }
                Err(_) => break,
            }
        }
        self.gate.tick(self.pipeline.tracker_mut());
        if reload.swap(false, Ordering::Relaxed) {
            reload_policy(self.config, &self.policy);
        }
        if self.policy.generation() != self.seen.policy {
            // Reloaded (SIGHUP or the file changed): new modes from now on.
            self.seen.policy = self.policy.generation();
            configure_kernel(
                self.gate.kernel(),
                self.config,
                &self.policy,
                self.enforcing,
            )?;
            self.gate.refresh_modes();
            audit_agent_event(
                self.runtime,
                &self.api.board,
                crate::store::audit::kinds::POLICY_RELOAD,
                serde_json::json!({ "generation": self.seen.policy, "policy": self.policy.source() }),
            );
        }
        if self.last_beat.elapsed() >= HEARTBEAT {
            self.heartbeat();
        }
        for decided in self.gate.take_decided() {
            self.pipeline.writer().decided(decided);
        }
        self.pipeline.push();
        Ok(())
    }

    /// A planner's estimate or a database's catalog arrived: what waited
    /// for it is decided.
    fn fresh_facts(&mut self) {
        if let Some(estimates) = &self.estimates {
            let generation = estimates.load(Ordering::Acquire);
            if generation != self.seen.estimate {
                self.seen.estimate = generation;
                self.gate.catalogs_changed(self.pipeline.tracker_mut());
            }
        }
        if let Some(catalogs) = &self.catalogs {
            if self.last_catalog_look.elapsed() >= CATALOG_SERVER_LOOK {
                self.last_catalog_look = Instant::now();
                catalogs.set_server(catalog_server(&self.config.capture.ports));
                catalogs.set_mysql_servers(mysql_servers(&self.config.capture.mysql_ports));
            }
            let generation = catalogs.generation();
            if generation != self.seen.catalog {
                self.seen.catalog = generation;
                self.gate.catalogs_changed(self.pipeline.tracker_mut());
            }
        }
    }

    /// Tells the kernel the agent is alive; looks for lost records, stopped
    /// backends nobody heard of, and connections idle too long.
    fn heartbeat(&mut self) {
        self.last_beat = Instant::now();
        if let Err(e) = self.gate.kernel().heartbeat() {
            warn!("heartbeat: {e}");
        }
        self.gate.reap_orphan_stops();
        let counters = self.capture.counters();
        let (runtime, board) = (self.runtime, &self.api.board);
        self.losses
            .check(&counters, &self.pipeline, |kind, details| {
                audit_agent_event(runtime, board, kind, details)
            });
        self.pipeline.tick(crate::clock::now());
    }

    /// Flushes the store, audits the stop, and unpins the programs unless
    /// statements are still held (the next agent picks those up).
    fn stop(mut self) -> Result<(), AgentError> {
        info!("stopping");
        let counters = self.capture.counters();
        self.pipeline
            .writer()
            .record_capture_loss(crate::clock::now(), counters);
        let (summary, stats) = self
            .pipeline
            .finish(crate::clock::now())
            .map_err(|source| AgentError::Store {
                path: self.config.store.path.clone(),
                source,
            })?;
        info!(?summary, ?stats, "store flushed");
        audit_agent_event(
            self.runtime,
            &self.api.board,
            crate::store::audit::kinds::AGENT_STOP,
            serde_json::json!({ "summary": summary, "gate": self.gate.stats() }),
        );
        if let Some(stream) = self.stream.take() {
            stream.finish();
        }
        if self.gate.holding() == 0 {
            self.capture.unpin();
        } else {
            // The kernel keeps holding; the next agent picks the holds up.
            info!(
                connections = self.gate.holding(),
                "statements still held: pins kept for the next agent"
            );
        }
        self.api.stop.notify_one();
        let _ = self.runtime.block_on(self.api.task);
        Ok(())
    }
}

/// Sets this thread's niceness (threads started later inherit it). A
/// failure (no CAP_SYS_NICE) is logged, not fatal: the agent still works.
fn set_nice(nice: i32) {
    if let Err(e) = crate::set_thread_nice(nice) {
        warn!(nice, "setting the agent's niceness: {e}");
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

/// The gated MariaDB/MySQL servers whose planners estimate writes (see
/// `catalog::mysql`): found in this network namespace, with their Unix
/// sockets.
fn mysql_servers(ports: &[u16]) -> Vec<catalog::mysql::MysqlServer> {
    catalog::mysql::find_servers(ports)
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
        match policy::needs_gate(&policy.current(), &Subject::default(), false) {
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
