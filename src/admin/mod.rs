//! The router's own endpoints: worker registration in SlimeRouter's shape (`legacy`) and in
//! SGLang router's (`workers`), session keys (`sessions`), `/metrics` and `/engine_metrics`.
//! Everything else is proxied.

mod input;
mod legacy;
mod sessions;
mod workers;

use bytes::Bytes;
use http::{Method, Request, Response, header};
use hyper::body::Incoming;

use crate::app::App;
use crate::body::RouterBody;
use crate::engine_metrics;
use crate::error::RouterError;

/// An admin endpoint, whatever the method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    AddWorker,
    RemoveWorker,
    ListWorkers,
    Workers,
    Worker,
    Metrics,
    EngineMetrics,
    FinishSession,
}

impl Route {
    /// The admin route for `path`, if it is one.
    pub fn of(path: &str) -> Option<Self> {
        Some(match path {
            "/add_worker" => Self::AddWorker,
            "/remove_worker" => Self::RemoveWorker,
            "/list_workers" => Self::ListWorkers,
            "/workers" => Self::Workers,
            "/metrics" => Self::Metrics,
            "/engine_metrics" => Self::EngineMetrics,
            "/finish_session" => Self::FinishSession,
            p if p.starts_with("/workers/") => Self::Worker,
            _ => return None,
        })
    }

    fn needs_admin_key(self) -> bool {
        matches!(
            self,
            Self::AddWorker | Self::RemoveWorker | Self::ListWorkers | Self::Workers | Self::Worker
        )
    }
}

/// Answers an admin call.
pub async fn serve(
    app: &App,
    route: Route,
    req: Request<Incoming>,
) -> Result<Response<RouterBody>, RouterError> {
    if route.needs_admin_key() {
        check_admin_key(app.admin_key(), &req)?;
    }
    let path = req.uri().path().to_owned();
    match (route, req.method().clone()) {
        (Route::AddWorker, Method::POST) => legacy::add(app, req).await,
        (Route::RemoveWorker, Method::POST) => legacy::remove(app, req).await,
        (Route::ListWorkers, Method::GET) => Ok(legacy::list(app)),
        (Route::Workers, Method::POST) => workers::post(app, req).await,
        (Route::Workers, Method::GET) => Ok(workers::list(app)),
        (Route::Worker, Method::GET) => workers::get(app, &path),
        (Route::Worker, Method::DELETE) => workers::delete(app, &path),
        (Route::Metrics, Method::GET) => Ok(metrics(app)),
        (Route::EngineMetrics, Method::GET) => Ok(engine_metrics::serve(app).await),
        (Route::FinishSession, Method::POST) => sessions::finish(app, req).await,
        (_, method) => Err(RouterError::MethodNotAllowed {
            method: method.to_string(),
            path,
        }),
    }
}

fn metrics(app: &App) -> Response<RouterBody> {
    let text = app.metrics().render();
    let mut response = Response::new(RouterBody::full(Bytes::from(text)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    response
}

fn check_admin_key(key: Option<&str>, req: &Request<Incoming>) -> Result<(), RouterError> {
    let Some(key) = key else { return Ok(()) };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .unwrap_or_default();
    if constant_time_eq(presented.as_bytes(), key.as_bytes()) {
        Ok(())
    } else {
        Err(RouterError::Unauthorized(
            "worker management requires Authorization: Bearer <admin key>",
        ))
    }
}

/// The token of `Bearer <token>`; the scheme is case-insensitive (RFC 9110 §11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares without an early exit, so response time does not reveal how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_compares() {
        assert!(super::constant_time_eq(b"abc", b"abc"));
        assert!(!super::constant_time_eq(b"abc", b"abd"));
        assert!(!super::constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for header in ["Bearer k", "bearer k", "BEARER  k"] {
            assert_eq!(super::bearer_token(header), Some("k"), "{header}");
        }
        assert_eq!(super::bearer_token("Basic k"), None);
        assert_eq!(super::bearer_token("Bearerk"), None);
    }
}
