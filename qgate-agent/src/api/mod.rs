//! The reviewers' HTTP API (axum, JSON, under `/v1`) and the gate's door to held requests.
//!
//! | piece | file | does |
//! | --- | --- | --- |
//! | [`RequestBoard`] | `board.rs` | the gate creates requests here and learns decisions from [`RequestBoard::subscribe`] |
//! | routes | `routes.rs` | requests, decisions, event stream, health, OpenAPI document |
//! | audit | `audit.rs` | audit search, export (JSON lines / CSV), chain verification |
//! | auth | `auth.rs` | bearer tokens, roles, rate limit on failures |
//! | [`webhook`] | `webhook.rs` | signed, retried notifications of new requests and decisions |
//! | [`metrics`] | `metrics.rs` | the Prometheus registry every stage increments |
//! | TLS | `tls.rs` | rustls for non-loopback listeners |
//! | inbox | `ui.rs`, `ui/` | the reviewers' web page at `/ui/` (embedded static files over this API) |
//!
//! [`serve`] runs the HTTP server together with the expiry of overdue
//! requests and the webhook dispatcher; the agent's run loop calls it.
mod audit;
mod auth;
mod error;
pub mod metrics;
mod routes;
mod tls;
mod ui;
pub mod webhook;

use std::{future::Future, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use axum::serve::ListenerExt;
use tokio::net::TcpListener;

pub use crate::board::{BoardError, RequestBoard, RequestEvent, RequestEventKind};
pub use error::ErrorBody;
pub use tls::TlsFiles;
pub use webhook::WebhookOptions;

/// Where the agent keeps its SQLite store unless configured otherwise.
pub const DEFAULT_STORE_PATH: &str = "/var/lib/qgate/qgate.sqlite";
/// Where the API listens unless configured otherwise: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9187";

/// Everything the API needs besides the store.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// How long a held statement waits for reviewers before it is denied as
    /// expired; must stay below what the client's TCP tolerates (~15 min).
    pub hold_timeout: Duration,
    pub webhooks: WebhookOptions,
    /// Failed authentications per client address per minute before it gets 429s.
    pub auth_failures_per_minute: u32,
    /// Largest request body accepted.
    pub body_limit_bytes: usize,
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            hold_timeout: Duration::from_secs(10 * 60),
            webhooks: WebhookOptions::default(),
            auth_failures_per_minute: 10,
            body_limit_bytes: 64 * 1024,
        }
    }
}

/// How [`serve`] exposes the API.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Serve HTTPS with these files; required for a non-loopback address
    /// unless `allow_plaintext_remote` is set.
    pub tls: Option<TlsFiles>,
    /// The operator explicitly accepts plaintext on a non-loopback address
    /// (e.g. TLS terminated by something in front).
    pub allow_plaintext_remote: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("refusing to serve the API in plaintext on non-loopback address {0}: configure TLS (cert and key) or allow plaintext explicitly")]
    PlaintextRemote(SocketAddr),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error(transparent)]
    Board(#[from] BoardError),
}

/// Shared state of every handler: cheap to clone.
#[derive(Clone)]
pub struct AppState {
    board: RequestBoard,
    options: Arc<ApiOptions>,
    limiter: Arc<auth::FailureLimiter>,
    metrics: ::metrics_exporter_prometheus::PrometheusHandle,
    /// Turns true when [`serve`] shuts down, ending the open event streams
    /// that would otherwise keep a graceful shutdown waiting forever.
    closing: Arc<tokio::sync::watch::Sender<bool>>,
}

impl AppState {
    /// Opens (and migrates) the store at `db_path` and builds the state.
    pub fn open(db_path: &Path, options: ApiOptions) -> Result<Self, BoardError> {
        let board = RequestBoard::open(db_path, options.hold_timeout)?;
        Ok(Self::new(board, options))
    }

    pub fn new(board: RequestBoard, options: ApiOptions) -> Self {
        AppState {
            board,
            limiter: Arc::new(auth::FailureLimiter::new(options.auth_failures_per_minute)),
            options: Arc::new(options),
            metrics: metrics::install(),
            closing: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    /// The door the gate uses; shares the store and event stream with the API.
    pub fn board(&self) -> &RequestBoard {
        &self.board
    }
}

/// The whole API as an axum router (what [`serve`] serves).
pub fn router(state: AppState) -> axum::Router {
    routes::router(state)
}

/// The OpenAPI document of the whole API, generated from the handlers.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes::openapi()
}

/// Serves the API on `listener` until `shutdown` resolves; also expires
/// overdue requests and delivers webhooks for as long as it runs.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let local = listener.local_addr()?;
    if options.tls.is_none() && !local.ip().is_loopback() && !options.allow_plaintext_remote {
        return Err(ServeError::PlaintextRemote(local));
    }
    let acceptor = options.tls.as_ref().map(tls::acceptor).transpose()?;
    let expiry = tokio::spawn(state.board.clone().run_expiry());
    let hooks = tokio::spawn(webhook::run(
        state.board.subscribe(),
        state.options.webhooks.clone(),
    ));
    let closing = state.closing.clone();
    let shutdown = async move {
        shutdown.await;
        closing.send_replace(true);
    };
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    let served = match acceptor {
        None => {
            tracing::info!(%local, "reviewer API listening (HTTP)");
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        Some(acceptor) => {
            tracing::info!(%local, "reviewer API listening (HTTPS)");
            let listener = tls::TlsListener::new(listener, acceptor).tap_io(|_| {});
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    };
    expiry.abort();
    hooks.abort();
    Ok(served?)
}
