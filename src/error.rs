//! The router's edge errors and their HTTP mapping: every status the router itself produces
//! is decided here, and every error body is JSON.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::RouterBody;

/// Why the router answered instead of a worker.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("{0}")]
    BadRequest(String),
    #[error("request body not received within {secs}s (--client-body-timeout-secs)")]
    ClientTimeout { secs: f64 },
    #[error("request body exceeds the {limit}-byte limit (--max-request-body-mib)")]
    BodyTooLarge { limit: usize },
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("method {method} not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("no live worker available")]
    NoLiveWorker,
    #[error("no live {0} worker: prefill/decode generation needs one live worker of each")]
    NoLiveRole(String),
    #[error("no worker reached a weight version --version-policy allows within {secs}s")]
    NoCurrentWorker { secs: f64 },
    #[error("worker {url} unreachable: {reason}")]
    Connect { url: String, reason: String },
    #[error("router out of resources reaching {url}: {reason}")]
    Exhausted { url: String, reason: String },
    #[error("worker {url} failed: {reason}")]
    Upstream { url: String, reason: String },
    #[error("worker {url} did not answer within {secs}s")]
    Timeout { url: String, secs: f64 },
    #[error("middleware {name} failed: {reason}")]
    Middleware { name: String, reason: String },
    #[error("router is shutting down")]
    ShuttingDown,
}

impl RouterError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::ClientTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::NoLiveWorker
            | Self::NoLiveRole(_)
            | Self::NoCurrentWorker { .. }
            | Self::Exhausted { .. }
            | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Connect { .. } | Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Middleware { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn into_response(self) -> Response<RouterBody> {
        let body = serde_json::json!({ "error": self.to_string() });
        json_response(self.status(), &body)
    }
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<RouterBody> {
    // Serialising our own serde types into a Vec cannot fail.
    let bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(RouterBody::full(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
