//! Bearer-token authentication, and a limit on failed attempts per address
//! so tokens cannot be guessed at network speed.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::{header, request::Parts},
};

use crate::store::requests::{Reviewer, Role};

use super::{error::ApiError, AppState};

const WINDOW: Duration = Duration::from_secs(60);
/// Forget idle addresses once this many are tracked, so the map cannot grow without bound.
const MAX_TRACKED: usize = 10_000;

/// Counts failed authentications per client address over a one-minute window.
pub struct FailureLimiter {
    per_window: u32,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailureLimiter {
    pub fn new(per_window: u32) -> Self {
        FailureLimiter {
            per_window: per_window.max(1),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(seconds to wait)` while `ip` is over its limit.
    fn check(&self, ip: IpAddr) -> Result<(), u64> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match failures.get(&ip) {
            Some((start, n)) if *n >= self.per_window && start.elapsed() < WINDOW => {
                Err((WINDOW - start.elapsed()).as_secs().max(1))
            }
            _ => Ok(()),
        }
    }

    fn record_failure(&self, ip: IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() >= MAX_TRACKED {
            failures.retain(|_, (start, _)| start.elapsed() < WINDOW);
        }
        let entry = failures.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

/// The authenticated reviewer behind a request (any role).
pub struct Caller(pub Reviewer);

impl Caller {
    /// Refuses auditors: only reviewers and admins change anything.
    pub fn require_decider(&self) -> Result<(), ApiError> {
        match self.0.role {
            Role::Auditor => Err(ApiError::forbidden(format!(
                "{:?} is an auditor: auditors read only",
                self.0.name
            ))),
            Role::Reviewer | Role::Admin => Ok(()),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        state.limiter.check(ip).map_err(ApiError::too_many)?;
        let token = match bearer(parts) {
            Ok(token) => token,
            Err(message) => {
                state.limiter.record_failure(ip);
                return Err(ApiError::unauthorized(message));
            }
        };
        match state.board.reviewer_by_token(token.to_owned()).await? {
            Some(reviewer) => Ok(Caller(reviewer)),
            None => {
                state.limiter.record_failure(ip);
                tracing::warn!(%ip, "API request with an unknown or revoked token");
                Err(ApiError::unauthorized("unknown or revoked token"))
            }
        }
    }
}

fn bearer(parts: &Parts) -> Result<&str, &'static str> {
    let value = parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or("missing Authorization: Bearer <token> header")?;
    let value = value
        .to_str()
        .map_err(|_| "Authorization header is not ASCII")?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or("Authorization header must be `Bearer <token>`")?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err("Authorization header must be `Bearer <token>`");
    }
    Ok(token.trim())
}
