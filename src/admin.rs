//! The router's own endpoints: worker registration in SlimeRouter's and SGLang router's
//! shapes, and /metrics. Everything else is proxied.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::json;

use crate::app::App;
use crate::body::RouterBody;
use crate::error::{RouterError, json_response};
use crate::pool::Pool;
use crate::request::read_request;
use crate::worker::{Worker, WorkerUrl};

/// Admin bodies are a url or two; anything bigger is a mistake.
const ADMIN_BODY_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    AddWorker,
    RemoveWorker,
    ListWorkers,
    Workers,
    Worker,
    Metrics,
}

impl Route {
    /// The admin route for `path`, if it is one (whatever the method).
    pub fn of(path: &str) -> Option<Self> {
        Some(match path {
            "/add_worker" => Self::AddWorker,
            "/remove_worker" => Self::RemoveWorker,
            "/list_workers" => Self::ListWorkers,
            "/workers" => Self::Workers,
            "/metrics" => Self::Metrics,
            p if p.starts_with("/workers/") => Self::Worker,
            _ => return None,
        })
    }

    fn needs_admin_key(self) -> bool {
        matches!(
            self,
            Self::AddWorker | Self::RemoveWorker | Self::Workers | Self::Worker
        )
    }
}

pub async fn serve(
    app: &App,
    route: Route,
    req: Request<Incoming>,
) -> Result<Response<RouterBody>, RouterError> {
    if route.needs_admin_key() {
        check_admin_key(app.admin_key(), &req)?;
    }
    let method = req.method().clone();
    match (route, method) {
        (Route::AddWorker, Method::POST) => {
            let url = url_from_request(req).await?;
            add_worker(app, &url)?;
            Ok(json_response(
                StatusCode::OK,
                &json!({"status": "success", "worker_urls": WorkerCounts(app.pool())}),
            ))
        }
        (Route::Workers, Method::POST) => {
            let (url, worker_type) = workers_post_body(req).await?;
            if worker_type.as_deref().is_some_and(|t| t != "regular") {
                return Err(RouterError::BadRequest(format!(
                    "worker_type {:?} is not supported; only regular workers",
                    worker_type.unwrap_or_default()
                )));
            }
            let canonical = add_worker(app, &url)?;
            Ok(json_response(
                StatusCode::OK,
                &json!({"status": "success", "url": canonical, "message": format!("Worker {canonical} registered")}),
            ))
        }
        (Route::RemoveWorker, Method::POST) => {
            let url = url_from_request(req).await?;
            let removed = remove_worker(app, &url)?;
            let urls: Vec<String> = app
                .pool()
                .snapshot()
                .iter()
                .map(|w| w.url().to_owned())
                .collect();
            Ok(json_response(
                StatusCode::OK,
                &json!({"status": "success", "removed": removed, "worker_urls": urls}),
            ))
        }
        (Route::ListWorkers, Method::GET) => {
            let urls: Vec<String> = app
                .pool()
                .snapshot()
                .iter()
                .map(|w| w.url().to_owned())
                .collect();
            Ok(json_response(StatusCode::OK, &json!({ "urls": urls })))
        }
        (Route::Workers, Method::GET) => {
            let workers: Vec<_> = app
                .pool()
                .snapshot()
                .iter()
                .map(|w| worker_entry(w))
                .collect();
            Ok(json_response(
                StatusCode::OK,
                &json!({ "workers": workers }),
            ))
        }
        (Route::Worker, method @ (Method::GET | Method::DELETE)) => {
            let url = decode_worker_path(req.uri().path())?;
            if method == Method::GET {
                let canonical = canonical(&url)?;
                let worker = app
                    .pool()
                    .find(&canonical)
                    .ok_or_else(|| not_found(&canonical))?;
                return Ok(json_response(StatusCode::OK, &worker_entry(&worker)));
            }
            let removed = remove_worker(app, &url)?;
            Ok(json_response(
                StatusCode::OK,
                &json!({"status": "success", "removed": removed, "message": format!("Worker {removed} removed")}),
            ))
        }
        (Route::Metrics, Method::GET) => {
            let text = app.metrics().render();
            let mut response = Response::new(RouterBody::full(Bytes::from(text)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            Ok(response)
        }
        (_, method) => Err(RouterError::MethodNotAllowed {
            method: method.to_string(),
            path: req.uri().path().to_owned(),
        }),
    }
}

fn add_worker(app: &App, raw: &str) -> Result<String, RouterError> {
    let url = WorkerUrl::parse(raw).map_err(RouterError::BadRequest)?;
    let (worker, added) = app.pool().add(url);
    if added {
        tracing::info!(worker = worker.url(), "worker added");
    } else if !worker.is_live() {
        // A dead worker registering again is likely back: check now instead of next round.
        app.probe_now().request(worker.clone());
    }
    Ok(worker.url().to_owned())
}

fn remove_worker(app: &App, raw: &str) -> Result<String, RouterError> {
    let url = canonical(raw)?;
    if !app.pool().remove(&url) {
        return Err(not_found(&url));
    }
    tracing::info!(worker = %url, "worker removed");
    Ok(url)
}

fn canonical(raw: &str) -> Result<String, RouterError> {
    WorkerUrl::parse(raw)
        .map(|u| u.as_str().to_owned())
        .map_err(RouterError::BadRequest)
}

fn not_found(url: &str) -> RouterError {
    RouterError::NotFound(format!("Worker {url} not found"))
}

fn worker_entry(worker: &Worker) -> serde_json::Value {
    json!({
        "url": worker.url(),
        "worker_type": "regular",
        "active_requests": worker.in_flight(),
        "is_healthy": worker.is_live(),
    })
}

/// `{"url": in-flight, ...}` in registration order, dead workers included (SlimeRouter's shape).
struct WorkerCounts<'a>(&'a Pool);

impl Serialize for WorkerCounts<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let workers = self.0.snapshot();
        serializer.collect_map(workers.iter().map(|w| (w.url(), w.in_flight())))
    }
}

fn check_admin_key(key: Option<&str>, req: &Request<Incoming>) -> Result<(), RouterError> {
    let Some(key) = key else { return Ok(()) };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if constant_time_eq(presented.as_bytes(), key.as_bytes()) {
        Ok(())
    } else {
        Err(RouterError::Unauthorized(
            "worker management requires Authorization: Bearer <admin key>",
        ))
    }
}

/// Compares without an early exit, so response time does not reveal how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

const URL_REQUIRED: &str = "worker_url is required (use query ?url=... or JSON body)";

/// The worker url from `?url=`/`?worker_url=`, else a JSON body `{"url"}`/`{"worker_url"}`.
async fn url_from_request(req: Request<Incoming>) -> Result<String, RouterError> {
    if let Some(query) = req.uri().query() {
        let found = form_urlencoded::parse(query.as_bytes())
            .find(|(k, v)| (k == "url" || k == "worker_url") && !v.is_empty())
            .map(|(_, v)| v.into_owned());
        if let Some(url) = found {
            return Ok(url);
        }
    }
    let body = json_body(req).await?;
    ["url", "worker_url"]
        .iter()
        .find_map(|k| {
            body.get(*k)
                .and_then(|v| v.as_str())
                .filter(|v| !v.is_empty())
        })
        .map(str::to_owned)
        .ok_or_else(|| RouterError::BadRequest(URL_REQUIRED.to_owned()))
}

async fn workers_post_body(
    req: Request<Incoming>,
) -> Result<(String, Option<String>), RouterError> {
    let body = json_body(req).await?;
    let url = body
        .get("url")
        .and_then(|v| v.as_str())
        .ok_or_else(|| RouterError::BadRequest("JSON body must carry \"url\"".to_owned()))?;
    let worker_type = body
        .get("worker_type")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    Ok((url.to_owned(), worker_type))
}

/// A JSON object body; an empty body is an empty object.
async fn json_body(
    req: Request<Incoming>,
) -> Result<serde_json::Map<String, serde_json::Value>, RouterError> {
    let bytes = read_request(&http::HeaderMap::new(), req.into_body(), ADMIN_BODY_LIMIT).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice(&bytes) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(RouterError::BadRequest(
            "JSON body must be an object".to_owned(),
        )),
        Err(e) => Err(RouterError::BadRequest(format!("malformed JSON body: {e}"))),
    }
}

fn decode_worker_path(path: &str) -> Result<String, RouterError> {
    let encoded = path.trim_start_matches("/workers/");
    let decoded = percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .map_err(|_| RouterError::BadRequest("worker url in the path is not UTF-8".to_owned()))?;
    Ok(decoded.into_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_compares() {
        assert!(super::constant_time_eq(b"abc", b"abc"));
        assert!(!super::constant_time_eq(b"abc", b"abd"));
        assert!(!super::constant_time_eq(b"abc", b"ab"));
    }
}
