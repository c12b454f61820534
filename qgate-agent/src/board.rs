//! The board of held requests: the one door through which the gate and the
//! API create, decide and watch requests.
//!
//! Every change is committed to SQLite (audit row included, fsync'd) before
//! its [`RequestEvent`] is broadcast, so the gate never acts on a decision a
//! crash could lose.
use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use rusqlite::Connection;
use serde::Serialize;
use tokio::sync::{broadcast, Notify};
use utoipa::ToSchema;

use crate::store::requests::{
    self as store, NewRequest, Refusal, Request, RequestError, RequestFilter, RequestStatus,
    Reviewer, Verdict, VoteError,
};

/// What the board measures (served at `/metrics` by the API).
pub mod metrics {
    /// Gauge: requests pending now.
    pub const HELD_NOW: &str = "qgate_requests_held";
    /// Counter, label `kind` = a [`super::RequestEventKind`]: request lifecycle events.
    pub const REQUEST_EVENTS: &str = "qgate_request_events_total";
    /// Histogram, seconds: how long a request waited until decided, expired or withdrawn.
    pub const REQUEST_WAIT: &str = "qgate_request_wait_seconds";
    /// Counter, label `kind` = an audit kind: audit entries that could not be
    /// written (each is also logged; a denial whose entry failed is still denied).
    pub const AUDIT_FAILURES: &str = "qgate_audit_write_failures_total";
}

/// Room for bursts: a receiver further behind than this gets `Lagged` and
/// must re-read the requests it cares about with [`RequestBoard::get`].
const EVENT_CAPACITY: usize = 4096;
/// The expiry sweeper wakes at least this often, even with nothing pending.
const EXPIRY_IDLE_WAKE: Duration = Duration::from_secs(30);
/// Keeps a store that keeps failing from turning the sweeper into a busy loop.
const EXPIRY_MIN_WAIT: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error("request {0} not found")]
    NotFound(i64),
    #[error("request {} is already {}", .0.id, .0.status.as_str())]
    Closed(Box<Request>),
    #[error("{0}")]
    Refused(Refusal),
    #[error(transparent)]
    Store(#[from] RequestError),
    #[error("store worker failed: {0}")]
    Worker(String),
}

impl From<VoteError> for BoardError {
    fn from(e: VoteError) -> Self {
        match e {
            VoteError::Request(RequestError::NotFound(id)) => BoardError::NotFound(id),
            VoteError::Request(e) => BoardError::Store(e),
            VoteError::Closed { request, .. } => BoardError::Closed(request),
            VoteError::Refused(r) => BoardError::Refused(r),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RequestEventKind {
    Created,
    /// One approval recorded; the request still waits for more.
    ApprovalRecorded,
    Approved,
    Denied,
    Expired,
    Withdrawn,
}

impl RequestEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestEventKind::Created => "created",
            RequestEventKind::ApprovalRecorded => "approval_recorded",
            RequestEventKind::Approved => "approved",
            RequestEventKind::Denied => "denied",
            RequestEventKind::Expired => "expired",
            RequestEventKind::Withdrawn => "withdrawn",
        }
    }

    /// Whether the request is over: the gate releases or denies the statement.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            RequestEventKind::Created | RequestEventKind::ApprovalRecorded
        )
    }
}

/// A durable change of a request, broadcast after its commit.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RequestEvent {
    pub kind: RequestEventKind,
    pub request_id: i64,
    /// The request as it stands after the change.
    pub request: Request,
}

/// Cheap to clone; all clones share one store connection and one event stream.
#[derive(Clone)]
pub struct RequestBoard {
    inner: Arc<BoardInner>,
}

struct BoardInner {
    /// One writer connection: SQLite serialises writers anyway, and the
    /// mutex keeps each transaction's fsync off the async threads' way.
    db: Mutex<Connection>,
    events: broadcast::Sender<RequestEvent>,
    hold_timeout: Duration,
    new_deadline: Notify,
}

impl RequestBoard {
    /// Opens (and migrates) the store at `path`.
    pub fn open(path: &Path, hold_timeout: Duration) -> Result<Self, BoardError> {
        let conn = store::open_db(path).map_err(RequestError::from)?;
        let held = store::count_pending(&conn)?;
        ::metrics::gauge!(metrics::HELD_NOW).set(held as f64);
        Ok(RequestBoard {
            inner: Arc::new(BoardInner {
                db: Mutex::new(conn),
                events: broadcast::channel(EVENT_CAPACITY).0,
                hold_timeout,
                new_deadline: Notify::new(),
            }),
        })
    }

    /// Every event from now on. On `RecvError::Lagged` re-read what you hold.
    pub fn subscribe(&self) -> broadcast::Receiver<RequestEvent> {
        self.inner.events.subscribe()
    }

    /// Runs `f` on the store connection on a blocking thread.
    pub(crate) async fn with_db<T, F>(&self, f: F) -> Result<T, BoardError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> T + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            // A panic mid-transaction rolled it back on unwind; the connection is sound.
            let mut conn = inner.db.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(|e| BoardError::Worker(e.to_string()))
    }

    /// Runs a change of requests on the store and announces it before the
    /// connection is let go, so subscribers hear of changes in the order
    /// they committed (a request that expires at once is never heard of as
    /// expired before it is heard of as created).
    async fn change<T, F>(&self, f: F) -> Result<T, BoardError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> (T, Option<(RequestEventKind, Request)>) + Send + 'static,
    {
        let board = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = board.inner.db.lock().unwrap_or_else(|p| p.into_inner());
            let (out, event) = f(&mut conn);
            if let Some((kind, request)) = event {
                board.announce(kind, &request);
            }
            out
        })
        .await
        .map_err(|e| BoardError::Worker(e.to_string()))
    }

    fn announce(&self, kind: RequestEventKind, request: &Request) {
        ::metrics::counter!(metrics::REQUEST_EVENTS, "kind" => kind.as_str()).increment(1);
        if kind.is_final() {
            if let Some(created) = crate::clock::parse(&request.created_at) {
                let waited = (crate::clock::now() - created).max(0) as f64 / 1e9;
                ::metrics::histogram!(metrics::REQUEST_WAIT).record(waited);
            }
        }
        // No receiver is not an error: the API may run without a gate in tests.
        let _ = self.inner.events.send(RequestEvent {
            kind,
            request_id: request.id,
            request: request.clone(),
        });
    }

    async fn refresh_held_gauge(&self) {
        if let Ok(Ok(n)) = self.with_db(|c| store::count_pending(c)).await {
            ::metrics::gauge!(metrics::HELD_NOW).set(n as f64);
        }
    }

    /// Records a held statement (durably) and announces it.
    pub async fn create(&self, new: NewRequest) -> Result<Request, BoardError> {
        let timeout = self.inner.hold_timeout;
        let request = self
            .change(move |c| match store::create_request(c, &new, timeout) {
                Ok(request) => {
                    let event = (RequestEventKind::Created, request.clone());
                    (Ok(request), Some(event))
                }
                Err(e) => (Err(e), None),
            })
            .await??;
        self.inner.new_deadline.notify_one();
        self.refresh_held_gauge().await;
        self.apply_preapprovals(&request).await;
        Ok(request)
    }

    /// Votes the approvals reviewers gave ahead of time for this statement
    /// (`store::preapprovals`), each through the ordinary vote: its rules
    /// (no self-approval, distinct reviewers) apply. The gate hears of the
    /// approval as of any other.
    async fn apply_preapprovals(&self, request: &Request) {
        use crate::store::preapprovals;
        let Some(user) = request.identity.db_user.clone() else {
            // An unknown user matches no pre-approval.
            return;
        };
        let pieces = crate::classify::script::split_psql(&request.statement);
        let parts: Option<Vec<String>> =
            pieces.iter().map(|p| preapprovals::normalize(p)).collect();
        let Some(parts) = parts.filter(|p| !p.is_empty()) else {
            return;
        };
        let taken = match self
            .with_db(move |c| preapprovals::take(c, &user, &parts))
            .await
        {
            Ok(Ok(taken)) => taken,
            Ok(Err(e)) => {
                tracing::warn!(request = request.id, "reading pre-approvals: {e}");
                return;
            }
            Err(e) => {
                tracing::warn!(request = request.id, "reading pre-approvals: {e}");
                return;
            }
        };
        let mut open = true;
        for (ids, reviewer_id) in taken {
            let reviewer = if open {
                self.with_db(move |c| {
                    crate::store::reviewers::active_reviewer_by_id(c, reviewer_id)
                })
                .await
                .ok()
                .and_then(Result::ok)
                .flatten()
            } else {
                None
            };
            let applied = match reviewer {
                Some(reviewer) => {
                    let comment = format!(
                        "pre-approved (#{})",
                        ids.first().copied().unwrap_or_default()
                    );
                    match self
                        .vote(request.id, &reviewer, Verdict::Approve, Some(comment))
                        .await
                    {
                        Ok(r) => {
                            tracing::info!(request = request.id, reviewer = %reviewer.name, "pre-approval applied");
                            open = r.status == RequestStatus::Pending;
                            true
                        }
                        Err(e) => {
                            tracing::info!(request = request.id, reviewer = %reviewer.name, "pre-approval not applied: {e}");
                            false
                        }
                    }
                }
                None => false,
            };
            if !applied {
                let _ = self
                    .with_db(move |c| preapprovals::give_back(c, &ids))
                    .await;
            }
        }
    }

    pub async fn get(&self, id: i64) -> Result<Option<Request>, BoardError> {
        Ok(self.with_db(move |c| store::get_request(c, id)).await??)
    }

    pub async fn list(&self, filter: RequestFilter) -> Result<Vec<Request>, BoardError> {
        Ok(self
            .with_db(move |c| store::list_requests(c, &filter))
            .await??)
    }

    /// The active reviewer holding `token`, if any.
    pub async fn reviewer_by_token(&self, token: String) -> Result<Option<Reviewer>, BoardError> {
        Ok(self
            .with_db(move |c| store::reviewer_by_token(c, &token))
            .await??)
    }

    /// Records one reviewer's verdict. Approve counts towards the N distinct
    /// approvals, one Deny ends the request, ForceApprove (an admin's break-glass)
    /// ignores N and groups but never allows self-approval.
    pub async fn vote(
        &self,
        id: i64,
        reviewer: &Reviewer,
        verdict: Verdict,
        comment: Option<String>,
    ) -> Result<Request, BoardError> {
        let who = reviewer.clone();
        let outcome = self
            .change(move |c| {
                let outcome = store::vote(c, id, &who, verdict, comment.as_deref());
                let event = match &outcome {
                    Ok(o) => Some((
                        match (o.closed, o.request.status) {
                            (false, _) => RequestEventKind::ApprovalRecorded,
                            (true, RequestStatus::Denied) => RequestEventKind::Denied,
                            (true, _) => RequestEventKind::Approved,
                        },
                        o.request.clone(),
                    )),
                    Err(VoteError::Closed {
                        request,
                        expired_now: true,
                    }) => Some((RequestEventKind::Expired, (**request).clone())),
                    Err(_) => None,
                };
                (outcome, event)
            })
            .await?;
        match outcome {
            Ok(outcome) => {
                if outcome.closed {
                    self.refresh_held_gauge().await;
                }
                Ok(outcome.request)
            }
            Err(VoteError::Closed {
                request,
                expired_now: true,
            }) => {
                self.refresh_held_gauge().await;
                Err(BoardError::Closed(request))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Ends a pending request as expired (its deadline passed).
    pub async fn expire(&self, id: i64) -> Result<Request, BoardError> {
        self.close_by_qgate(id, RequestStatus::Expired, None).await
    }

    /// Ends a pending request the gate no longer holds (e.g. the client disconnected).
    pub async fn withdraw(&self, id: i64, reason: &str) -> Result<Request, BoardError> {
        self.close_by_qgate(id, RequestStatus::Withdrawn, Some(reason.to_owned()))
            .await
    }

    async fn close_by_qgate(
        &self,
        id: i64,
        status: RequestStatus,
        reason: Option<String>,
    ) -> Result<Request, BoardError> {
        let kind = match status {
            RequestStatus::Expired => RequestEventKind::Expired,
            _ => RequestEventKind::Withdrawn,
        };
        let request = self
            .change(
                move |c| match store::close_by_qgate(c, id, status, reason.as_deref()) {
                    Ok(request) => {
                        let event = (kind, request.clone());
                        (Ok(request), Some(event))
                    }
                    Err(e) => (Err(e), None),
                },
            )
            .await?
            .map_err(BoardError::from)?;
        self.refresh_held_gauge().await;
        Ok(request)
    }

    /// Writes an audit row of the agent's own (e.g. `agent.start`, `agent.stop`,
    /// `policy.reload`), durably, on the board's connection. A failure is
    /// logged and counted in `/metrics` (`qgate_audit_write_failures_total`)
    /// here, once, before the caller sees it.
    pub async fn audit(
        &self,
        kind: crate::store::audit::Kind,
        details: serde_json::Value,
    ) -> Result<i64, BoardError> {
        let written = self
            .with_db(move |c| store::append_audit(c, kind, details))
            .await
            .and_then(|r| r.map_err(BoardError::from));
        if let Err(e) = &written {
            tracing::error!(kind = %kind, "audit entry not written: {e}");
            ::metrics::counter!(metrics::AUDIT_FAILURES, "kind" => kind.as_str()).increment(1);
        }
        written
    }

    /// Expires every pending request whose deadline has passed; returns their ids.
    pub async fn expire_due(&self) -> Result<Vec<i64>, BoardError> {
        let now = crate::clock::now();
        let due = self
            .with_db(move |c| store::due_for_expiry(c, now))
            .await??;
        let mut expired = Vec::with_capacity(due.len());
        for id in due {
            match self.expire(id).await {
                Ok(_) => expired.push(id),
                // Decided between the scan and now: nothing to expire.
                Err(BoardError::Closed(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(expired)
    }

    /// Expires requests at their deadlines, forever; [`crate::api::serve`] runs it.
    pub async fn run_expiry(self) {
        loop {
            if let Err(e) = self.expire_due().await {
                tracing::error!(error = %e, "expiring overdue requests");
            }
            let next = self
                .with_db(|c| store::next_deadline(c))
                .await
                .ok()
                .and_then(Result::ok)
                .flatten();
            let wait = next
                .map(|at| Duration::from_nanos((at - crate::clock::now()).max(0) as u64))
                .unwrap_or(EXPIRY_IDLE_WAKE)
                .clamp(EXPIRY_MIN_WAIT, EXPIRY_IDLE_WAKE);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.inner.new_deadline.notified() => {}
            }
        }
    }
}
