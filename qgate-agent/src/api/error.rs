//! Every failure of the API as JSON saying what was wrong.
use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::Serialize;
use utoipa::ToSchema;

use crate::store::requests::{Refusal, Request};

use crate::board::BoardError;

/// The body of every 4xx/5xx answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable class: `bad_request`, `unauthorized`, `forbidden`,
    /// `self_approval`, `not_found`, `conflict`, `too_many_requests`, …
    pub error: String,
    /// What was wrong, for a human.
    pub message: String,
    /// For a 409: the request's current state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<Box<Request>>,
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                error: error.to_owned(),
                message: message.into(),
                request: None,
            },
            retry_after_secs: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn too_many(retry_after_secs: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            format!(
                "too many failed authentications from this address; retry in {retry_after_secs} s"
            ),
        );
        e.retry_after_secs = Some(retry_after_secs);
        e
    }

    pub fn internal(message: impl std::fmt::Display) -> Self {
        tracing::error!(error = %message, "API internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("internal error: {message}"),
        )
    }

    /// From an axum extractor's rejection (bad JSON, query, path, body size).
    pub fn rejection(status: StatusCode, message: String) -> Self {
        let error = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::UNPROCESSABLE_ENTITY => "invalid_body",
            s if s.is_server_error() => return Self::internal(message),
            _ => "bad_request",
        };
        // Unprocessable and bad syntax are both the client's fault; keep one status.
        let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
            StatusCode::BAD_REQUEST
        } else {
            status
        };
        Self::new(status, error, message)
    }
}

impl From<BoardError> for ApiError {
    fn from(e: BoardError) -> Self {
        match e {
            BoardError::NotFound(id) => Self::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("request {id} not found"),
            ),
            BoardError::Closed(request) => {
                let mut err = Self::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    format!(
                        "request {} is already {} and cannot be decided again",
                        request.id,
                        request.status.as_str()
                    ),
                );
                err.body.request = Some(request);
                err
            }
            BoardError::Refused(refusal) => {
                let message = refusal.to_string();
                match refusal {
                    Refusal::SelfApproval { .. } | Refusal::UnknownRequester { .. } => {
                        Self::new(StatusCode::FORBIDDEN, "self_approval", message)
                    }
                    Refusal::AlreadyApproved { .. } => {
                        Self::new(StatusCode::CONFLICT, "already_approved", message)
                    }
                    Refusal::ReadOnly | Refusal::NotAdmin | Refusal::NotInGroup { .. } => {
                        Self::forbidden(message)
                    }
                }
            }
            e @ (BoardError::Store(_) | BoardError::Worker(_)) => Self::internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"qgate\""),
            );
        }
        response
    }
}
