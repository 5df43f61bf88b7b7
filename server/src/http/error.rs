//! Every error the HTTP API can answer, and the one `match` that maps each to a status code and
//! an OpenAI-shaped body: `{"error": {"message", "type", "code"}}`.

use super::MAX_JSON_BODY_BYTES;
use crate::engine::EngineError;
use crate::jobs::JobsError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Seconds a client told to back off (429, 503 while draining) should wait before retrying.
pub const RETRY_AFTER_SECONDS: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request cannot be parsed: bad JSON, wrong types, missing fields or parts.
    #[error("{0}")]
    Malformed(String),
    /// No key, or a key that is not in the keys file.
    #[error("missing or invalid API key (send `Authorization: Bearer KEY`)")]
    Unauthorized,
    /// A valid key that may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// Unknown to this caller (another tenant's adapter is unknown too).
    #[error("the {what} `{name}` does not exist or you do not have access to it")]
    NotFound { what: &'static str, name: String },
    #[error("{0}")]
    TooLarge(String),
    /// Valid, but not in the current state of what it names (cancelling a finished job).
    #[error("{0}")]
    Conflict(String),
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// Well-formed, but a parameter value is not acceptable.
    #[error("{message}")]
    InvalidParameter { param: Option<&'static str>, message: String },
    /// An uploaded adapter that fails validation against the resident base.
    #[error("invalid adapter: {0}")]
    InvalidAdapter(String),
    #[error("{0}")]
    Overloaded(String),
    /// A tenant quota from the keys file that frees up with time (request rate, sequences at
    /// once): 429 with `Retry-After`.
    #[error("{0}")]
    QuotaExceeded(String),
    /// A tenant quota on what it holds (adapters, their bytes, files): 429 without
    /// `Retry-After`, since waiting frees nothing; deleting does.
    #[error("{0}")]
    QuotaHeld(String),
    #[error("{0}")]
    NotReady(String),
    #[error("the request did not finish within {0} seconds")]
    Timeout(u64),
    /// The server's disk is full: nothing was stored, the client may retry later.
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        ApiError::InvalidParameter { param: Some(param), message: message.into() }
    }

    /// The answer to a write that found no room (disk full, quota or file-size limit reached);
    /// `outcome` says what became of the request. The detail (paths) goes to the log only.
    pub fn out_of_space(outcome: &str, detail: &str) -> Self {
        tracing::error!(%detail, "out of disk space");
        ApiError::InsufficientStorage(format!(
            "the server has no disk space left: {outcome}; retry once space is freed"
        ))
    }

    /// Status, OpenAI error type and code.
    fn parts(&self) -> (StatusCode, &'static str, Option<&'static str>) {
        match self {
            ApiError::Malformed(_) => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            ApiError::Unauthorized => {
                (StatusCode::UNAUTHORIZED, "authentication_error", Some("invalid_api_key"))
            }
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "permission_error", Some("forbidden")),
            ApiError::NotFound { what: "model", .. } => {
                (StatusCode::NOT_FOUND, "invalid_request_error", Some("model_not_found"))
            }
            ApiError::NotFound { .. } => (StatusCode::NOT_FOUND, "invalid_request_error", Some("not_found")),
            ApiError::TooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", Some("payload_too_large"))
            }
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "invalid_request_error", Some("conflict")),
            ApiError::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", Some("method_not_allowed"))
            }
            ApiError::InvalidParameter { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", Some("invalid_parameter"))
            }
            ApiError::InvalidAdapter(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", Some("invalid_adapter"))
            }
            ApiError::Overloaded(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("server_overloaded"))
            }
            ApiError::QuotaExceeded(_) | ApiError::QuotaHeld(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("quota_exceeded"))
            }
            ApiError::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("not_ready")),
            ApiError::Timeout(_) => (StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("timeout")),
            ApiError::InsufficientStorage(_) => {
                (StatusCode::INSUFFICIENT_STORAGE, "server_error", Some("insufficient_storage"))
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// The JSON body (also sent as an SSE event when a stream fails after it started).
    pub fn body(&self) -> serde_json::Value {
        let (_, kind, code) = self.parts();
        let param = match self {
            ApiError::InvalidParameter { param, .. } => *param,
            _ => None,
        };
        json!({"error": {"message": self.to_string(), "type": kind, "code": code, "param": param}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry = !matches!(self, ApiError::QuotaHeld(_))
            && matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE);
        let mut response = (status, axum::Json(self.body())).into_response();
        if retry {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }
}

impl From<JobsError> for ApiError {
    fn from(e: JobsError) -> Self {
        match e {
            JobsError::NotFound { what: "model", id } => ApiError::NotFound { what: "model", name: id },
            JobsError::NotFound { what, id } => ApiError::NotFound { what, name: id },
            JobsError::Invalid { param, message } => {
                ApiError::InvalidParameter { param: Some(param), message }
            }
            e @ JobsError::InvalidFile(_) => {
                ApiError::InvalidParameter { param: Some("file"), message: e.to_string() }
            }
            JobsError::Conflict(m) => ApiError::Conflict(m),
            e @ JobsError::Io(_) => ApiError::Internal(e.to_string()),
            JobsError::OutOfSpace(detail) => {
                ApiError::out_of_space("the jobs directory could not be written", &detail)
            }
            // Files held and the places of adapters.
            JobsError::Quota(message) => ApiError::QuotaHeld(message),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidRequest(m) => ApiError::InvalidParameter { param: None, message: m },
            e @ EngineError::PromptTooLong { .. } => ApiError::invalid("max_tokens", e.to_string()),
            e @ EngineError::Overloaded { .. } => ApiError::Overloaded(e.to_string()),
            EngineError::Stopped => ApiError::NotReady("the engine has stopped".into()),
            e @ (EngineError::Model(_) | EngineError::Tokenizer(_) | EngineError::Internal(_)) => {
                ApiError::Internal(e.to_string())
            }
        }
    }
}

impl From<super::quota::QuotaError> for ApiError {
    fn from(e: super::quota::QuotaError) -> Self {
        if e.frees_with_time() {
            ApiError::QuotaExceeded(e.to_string())
        } else {
            ApiError::QuotaHeld(e.to_string())
        }
    }
}

/// A JSON request body, parsed whatever its content type says (`curl -d` sends a form type),
/// whose every failure is an [`ApiError`] in OpenAI's shape: 413 past the body limit, 400 for
/// unreadable or malformed JSON.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = axum::body::Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge(format!(
                    "the request body is larger than the limit of {MAX_JSON_BODY_BYTES} bytes"
                ))
            } else {
                ApiError::Malformed(e.body_text())
            }
        })?;
        serde_json::from_slice(&body)
            .map(JsonBody)
            .map_err(|e| ApiError::Malformed(format!("invalid request body: {e}")))
    }
}
