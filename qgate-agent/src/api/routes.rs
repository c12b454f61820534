//! The HTTP surface: every route is declared once, with its OpenAPI
//! description next to the handler, so the document cannot drift.
use std::{convert::Infallible, sync::OnceLock, time::Duration};

use axum::{
    body::Bytes,
    extract::{
        rejection::{BytesRejection, PathRejection, QueryRejection},
        DefaultBodyLimit, Path, Query, State,
    },
    http::{header, HeaderMap, StatusCode},
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
    Json,
};
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::{errors::BroadcastStreamRecvError, BroadcastStream};
use utoipa::{
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    IntoParams, Modify, OpenApi, ToSchema,
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::store::requests::{Request, RequestFilter, RequestStatus, Reviewer, Verdict};

use super::{audit, auth::Caller, error::ApiError, AppState, ErrorBody, RequestEvent};

const MAX_COMMENT_CHARS: usize = 2000;
const DEFAULT_LIST_LIMIT: u32 = 100;
const MAX_LIST_LIMIT: u32 = 1000;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "qgate reviewer API",
        description = "Held statements awaiting approval, decisions, events and the audit log. \
            Every endpoint but /v1/health needs `Authorization: Bearer <token>` \
            (tokens come from `qgate-agent reviewers add`)."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "requests", description = "Held statements and their decisions"),
        (name = "audit", description = "Search, export and verify the audit log"),
        (name = "meta", description = "Health, metrics, this document"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health))
        .routes(routes!(openapi_json))
        .routes(routes!(prometheus_metrics))
        .routes(routes!(whoami))
        .routes(routes!(list_requests))
        .routes(routes!(get_request))
        .routes(routes!(approve))
        .routes(routes!(deny))
        .routes(routes!(force_approve))
        .routes(routes!(preapprove))
        .routes(routes!(events))
        .routes(routes!(audit::search_statements))
        .routes(routes!(audit::search_log))
        .routes(routes!(audit::verify))
}

pub fn openapi() -> utoipa::openapi::OpenApi {
    api_router().split_for_parts().1
}

pub fn router(state: AppState) -> axum::Router {
    let limit = state.options.body_limit_bytes;
    let (router, _) = api_router().split_for_parts();
    router
        .merge(super::ui::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not accept that method",
    )
}

#[derive(Serialize, ToSchema)]
struct Health {
    status: &'static str,
}

/// Liveness; the only endpoint without a token.
#[utoipa::path(get, path = "/v1/health", tag = "meta", security(()),
    responses((status = 200, body = Health)))]
async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta",
    responses((status = 200, content_type = "application/json", body = Object),
        (status = 401, body = ErrorBody)))]
async fn openapi_json(_caller: Caller) -> Response {
    static DOC: OnceLock<String> = OnceLock::new();
    let doc = DOC.get_or_init(|| openapi().to_pretty_json().unwrap_or_default());
    ([(header::CONTENT_TYPE, "application/json")], doc.clone()).into_response()
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, content_type = "text/plain", body = String),
        (status = 401, body = ErrorBody)))]
async fn prometheus_metrics(_caller: Caller, State(state): State<AppState>) -> Response {
    state.metrics.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// The reviewer the token belongs to.
#[utoipa::path(get, path = "/v1/me", tag = "meta",
    responses((status = 200, body = Reviewer), (status = 401, body = ErrorBody)))]
async fn whoami(Caller(me): Caller) -> Json<Reviewer> {
    Json(me)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    #[param(inline)]
    status: Option<RequestStatus>,
    /// DB user who sent the statement.
    user: Option<String>,
    database: Option<String>,
    /// Created at or after (RFC 3339).
    #[param(format = DateTime)]
    since: Option<String>,
    /// At most this many, newest first (default 100, max 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

pub(crate) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::rejection(e.status(), e.body_text()))
}

pub(crate) fn parse_time(
    name: &str,
    value: Option<&str>,
) -> Result<Option<crate::clock::UnixNanos>, ApiError> {
    value
        .map(|v| {
            crate::clock::parse(v).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "`{name}` must be an RFC 3339 timestamp such as 2026-01-31T12:00:00Z, got {v:?}"
                ))
            })
        })
        .transpose()
}

pub(crate) fn limit(value: Option<u32>, default: u32, max: u32) -> Result<u32, ApiError> {
    match value {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(format!(
            "`limit` must be between 1 and {max}, got {n}"
        ))),
    }
}

/// Requests, newest first.
#[utoipa::path(get, path = "/v1/requests", tag = "requests", params(ListQuery),
    responses((status = 200, body = Vec<Request>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody)))]
async fn list_requests(
    _caller: Caller,
    State(state): State<AppState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<Request>>, ApiError> {
    let q = query(q)?;
    let filter = RequestFilter {
        status: q.status,
        db_user: q.user,
        database: q.database,
        since: parse_time("since", q.since.as_deref())?,
        limit: limit(q.limit, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)?,
    };
    Ok(Json(state.board.list(filter).await?))
}

fn request_id(id: Result<Path<i64>, PathRejection>) -> Result<i64, ApiError> {
    match id {
        Ok(Path(id)) if id >= 1 => Ok(id),
        Ok(Path(id)) => Err(ApiError::bad_request(format!(
            "request id must be a positive integer, got {id}"
        ))),
        Err(e) => Err(ApiError::bad_request(format!(
            "request id must be a positive integer: {}",
            e.body_text()
        ))),
    }
}

/// One request.
#[utoipa::path(get, path = "/v1/requests/{id}", tag = "requests",
    params(("id" = i64, Path, minimum = 1, description = "Request id")),
    responses((status = 200, body = Request), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_request(
    _caller: Caller,
    State(state): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<Request>, ApiError> {
    let id = request_id(id)?;
    match state.board.get(id).await? {
        Some(request) => Ok(Json(request)),
        None => Err(super::BoardError::NotFound(id).into()),
    }
}

/// A decision's optional comment. An empty body means no comment.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionBody {
    /// Why (recorded in the audit); at most 2000 characters.
    #[schema(max_length = 2000)]
    pub comment: Option<String>,
}

/// Refuses a body not sent as `application/json`.
fn require_json(headers: &HeaderMap, what: &str) -> Result<(), ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if json {
        Ok(())
    } else {
        Err(ApiError::rejection(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("{what} must be JSON with `Content-Type: application/json`"),
        ))
    }
}

fn decision_body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Option<String>, ApiError> {
    let body = body.map_err(|e| ApiError::rejection(e.status(), e.body_text()))?;
    if body.is_empty() {
        return Ok(None);
    }
    require_json(headers, "a decision body")?;
    let invalid =
        |e: serde_json::Error| ApiError::bad_request(format!("invalid decision body: {e}"));
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(invalid)?;
    // serde would also read a struct from an array (`[null]`); only an object is a body.
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "invalid decision body: expected a JSON object such as {\"comment\": \"…\"}",
        ));
    }
    let parsed: DecisionBody = serde_json::from_value(value).map_err(invalid)?;
    match parsed.comment {
        Some(c) if c.chars().count() > MAX_COMMENT_CHARS => Err(ApiError::bad_request(format!(
            "comment is longer than {MAX_COMMENT_CHARS} characters"
        ))),
        Some(c) if c.trim().is_empty() => Ok(None),
        comment => Ok(comment),
    }
}

/// The approve, deny and force-approve endpoints differ only in the verdict they
/// record (and in their OpenAPI text), so they share checks and their order.
async fn decide(
    caller: Caller,
    state: AppState,
    id: Result<Path<i64>, PathRejection>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    verdict: Verdict,
) -> Result<Json<Request>, ApiError> {
    caller.require_decider()?;
    let id = request_id(id)?;
    let comment = decision_body(headers, body)?;
    Ok(Json(
        state.board.vote(id, &caller.0, verdict, comment).await?,
    ))
}

/// What a reviewer approves ahead of time.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreapproveBody {
    /// The database user who will send the statements.
    #[serde(rename = "for")]
    pub for_user: String,
    /// The statements, as a script (split like psql splits a file).
    pub sql: String,
    /// How long the approval holds, in seconds (at most 366 days).
    #[schema(minimum = 1, maximum = 31622400)]
    pub valid_s: i64,
    /// How many times each statement may be released by it.
    #[serde(default = "one")]
    #[schema(minimum = 1, maximum = 100000)]
    pub uses: i64,
}

fn one() -> i64 {
    1
}

/// Pre-approve statements for a database user: each statement of `sql`,
/// matched by its normalized text (layout, comments and the case of
/// unquoted names aside; literals exactly), is approved by the caller when
/// it is held within `valid_s`, `uses` times. The approval is an ordinary
/// vote then: no self-approval, N-of-M needs N reviewers' pre-approvals.
#[utoipa::path(post, path = "/v1/preapprovals", tag = "requests",
    request_body(content = PreapproveBody, content_type = "application/json"),
    responses((status = 200, body = Vec<crate::store::preapprovals::Preapproval>, description = "One per statement"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 415, body = ErrorBody)))]
async fn preapprove(
    caller: Caller,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Vec<crate::store::preapprovals::Preapproval>>, ApiError> {
    caller.require_decider()?;
    let body = body.map_err(|e| ApiError::rejection(e.status(), e.body_text()))?;
    require_json(&headers, "a pre-approval")?;
    let parsed: PreapproveBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid pre-approval: {e}")))?;
    if parsed.for_user.trim().is_empty() {
        return Err(ApiError::bad_request("`for` names no database user"));
    }
    if caller.0.db_users.contains(&parsed.for_user) {
        return Err(ApiError::forbidden(format!(
            "{:?} is linked to the database user {:?}: a reviewer never approves their own statements",
            caller.0.name, parsed.for_user
        )));
    }
    let statements = crate::classify::script::split_psql(&parsed.sql);
    let reviewer = caller.0.clone();
    let valid_ms = parsed.valid_s.saturating_mul(1000);
    let added = state
        .board
        .with_db(move |c| {
            crate::store::preapprovals::add(
                c,
                &reviewer,
                &parsed.for_user,
                &statements,
                valid_ms,
                parsed.uses,
            )
        })
        .await?;
    match added {
        Ok(list) => Ok(Json(list)),
        Err(crate::store::requests::RequestError::InvalidPreapproval(why)) => {
            Err(ApiError::bad_request(why))
        }
        Err(e) => Err(ApiError::internal(e)),
    }
}

/// Approve: counts as one of the N distinct approvals the rule asks for.
#[utoipa::path(post, path = "/v1/requests/{id}/approve", tag = "requests",
    params(("id" = i64, Path, minimum = 1, description = "Request id")),
    request_body(content = Option<DecisionBody>, content_type = "application/json"),
    responses((status = 200, body = Request, description = "The request after the vote"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "Wrong role or group, or self-approval (names the rule)"),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "Already decided, expired or withdrawn; or this reviewer already approved"),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody)))]
async fn approve(
    caller: Caller,
    State(state): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Request>, ApiError> {
    decide(caller, state, id, &headers, body, Verdict::Approve).await
}

/// Deny: one deny ends the request.
#[utoipa::path(post, path = "/v1/requests/{id}/deny", tag = "requests",
    params(("id" = i64, Path, minimum = 1, description = "Request id")),
    request_body(content = Option<DecisionBody>, content_type = "application/json"),
    responses((status = 200, body = Request), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody)))]
async fn deny(
    caller: Caller,
    State(state): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Request>, ApiError> {
    decide(caller, state, id, &headers, body, Verdict::Deny).await
}

/// Break-glass (admins only): approves at once whatever N and the groups;
/// recorded as forced. Self-approval is still refused.
#[utoipa::path(post, path = "/v1/requests/{id}/force-approve", tag = "requests",
    params(("id" = i64, Path, minimum = 1, description = "Request id")),
    request_body(content = Option<DecisionBody>, content_type = "application/json"),
    responses((status = 200, body = Request), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody)))]
async fn force_approve(
    caller: Caller,
    State(state): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Request>, ApiError> {
    decide(caller, state, id, &headers, body, Verdict::ForceApprove).await
}

/// Server-sent events: one `event:` per request change (`created`,
/// `approval_recorded`, `approved`, `denied`, `expired`, `withdrawn`), data
/// a `RequestEvent` as JSON. `lagged` means events were skipped: re-list.
#[utoipa::path(get, path = "/v1/events", tag = "requests",
    responses((status = 200, content_type = "text/event-stream", body = RequestEvent),
        (status = 401, body = ErrorBody)))]
async fn events(
    _caller: Caller,
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut closing = state.closing.subscribe();
    let closed = async move {
        let _ = closing.wait_for(|c| *c).await;
    };
    let stream = BroadcastStream::new(state.board.subscribe()).map(|item| {
        Ok(match item {
            Ok(event) => Event::default()
                .event(event.kind.as_str())
                .id(event.request_id.to_string())
                .json_data(&event)
                .unwrap_or_else(|e| Event::default().event("error").data(e.to_string())),
            Err(BroadcastStreamRecvError::Lagged(n)) => {
                Event::default().event("lagged").data(n.to_string())
            }
        })
    });
    Sse::new(stream.take_until(closed))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
