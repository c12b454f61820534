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
    capture::kernel::{pin_dir, CaptureError, KernelCapture},
    config::{Config, FailMode, GateSetting},
    gate::kernel::GateMode,
    pipeline::Pipeline,
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
}

/// How often the agent tells the kernel it is alive and reads its counters.
const HEARTBEAT: Duration = Duration::from_millis(250);

/// Runs until `stop` is set (the CLI sets it on SIGINT/SIGTERM).
pub fn run(
    config: &Config,
    interfaces: &[String],
    stop: Arc<AtomicBool>,
) -> Result<(), AgentError> {
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
    let writer = Writer::spawn(store, WriterConfig::default()).map_err(store_err)?;
    let mut pipeline = Pipeline::new(writer);

    api::metrics::install();
    let state = AppState::open(
        &config.store.path,
        ApiOptions {
            hold_timeout: Duration::from_secs(config.gate.hold_timeout_s),
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
            ServeOptions::default(),
            async move { api_stop.notified().await },
        ))
    };
    info!(listen = %config.api.listen, "API listening");

    let pins = pin_dir(&config.gate.pin_dir);
    let mut capture = KernelCapture::attach(interfaces, &config.capture.ports, &pins)?;
    let mut gate = capture.take_gate()?;
    let default_mode = match config.gate.mode {
        GateSetting::Monitor => GateMode::Monitor,
        GateSetting::Policy => GateMode::GateRisky,
    };
    gate.configure(
        default_mode,
        config.gate.fail == FailMode::Open,
        Duration::from_millis(config.gate.fail_after_ms),
        false,
    )
    .map_err(|e| AgentError::Gate(e.to_string()))?;
    let _ = runtime.block_on(board.audit(
        "agent.start",
        serde_json::json!({ "interfaces": interfaces, "ports": config.capture.ports, "mode": format!("{default_mode:?}") }),
    ));
    info!(?interfaces, ports = ?config.capture.ports, mode = ?default_mode, "capturing");

    let mut last_beat = Instant::now();
    let mut last_lost = 0;
    while !stop.load(Ordering::Relaxed) {
        capture.poll(Duration::from_millis(50), |seg| {
            pipeline.on_segment(&seg, |_, _| {});
        })?;
        if last_beat.elapsed() >= HEARTBEAT {
            last_beat = Instant::now();
            if let Err(e) = gate.heartbeat() {
                warn!("heartbeat: {e}");
            }
            let counters = capture.counters();
            if counters.lost() != last_lost {
                warn!(
                    ringbuf_full = counters.ringbuf_full,
                    truncated = counters.truncated,
                    load_errors = counters.load_errors,
                    "capture loss: some statements were not seen whole"
                );
                last_lost = counters.lost();
                pipeline
                    .writer()
                    .record_capture_loss(store::now_nanos(), counters);
            }
            pipeline.tick(store::now_nanos());
        }
    }

    info!("stopping");
    let counters = capture.counters();
    pipeline
        .writer()
        .record_capture_loss(store::now_nanos(), counters);
    let (summary, stats) = pipeline.finish(store::now_nanos()).map_err(store_err)?;
    info!(?summary, ?stats, "store flushed");
    let _ = runtime.block_on(board.audit("agent.stop", serde_json::json!({ "summary": summary })));
    capture.unpin();
    api_stop.notify_one();
    let _ = runtime.block_on(api_task);
    Ok(())
}
