//! SGLang router's worker API, as today's slime drives it: `POST /workers` to register (a
//! regular, prefill or decode worker), `GET /workers` to list them with their ids, and
//! `DELETE /workers/{id}` to remove one. Registration is synchronous: the worker is routable
//! when the call returns.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::input::{json_body, worker_in_path};
use crate::app::App;
use crate::body::RouterBody;
use crate::error::{RouterError, json_response};
use crate::worker::{Role, Worker, WorkerType, WorkerUrl};

/// `POST /workers {"url", "worker_type"?, "bootstrap_port"?}`.
pub async fn post(app: &App, req: Request<Incoming>) -> Result<Response<RouterBody>, RouterError> {
    let body = json_body(req).await?;
    let url = body
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| RouterError::BadRequest("JSON body must carry \"url\"".to_owned()))?;
    let kind = worker_type(&body)?;
    let worker = register(app, url, kind).await?;
    let mut answer = entry(&worker);
    answer["status"] = json!("success");
    answer["worker_id"] = json!(worker.id());
    answer["message"] = json!(format!("Worker {} registered", worker.url()));
    Ok(json_response(StatusCode::OK, &answer))
}

/// `GET /workers`: every worker, dead ones included, in registration order.
pub fn list(app: &App) -> Response<RouterBody> {
    let workers = app.pool().snapshot();
    let count = |role| workers.iter().filter(|w| w.kind().role() == role).count();
    let body = json!({
        "workers": workers.iter().map(|w| entry(w)).collect::<Vec<_>>(),
        "total": workers.len(),
        "stats": {
            "regular_count": count(Role::Regular),
            "prefill_count": count(Role::Prefill),
            "decode_count": count(Role::Decode),
        },
    });
    json_response(StatusCode::OK, &body)
}

/// `GET /workers/{id}` (or the url, percent-encoded).
pub fn get(app: &App, path: &str) -> Result<Response<RouterBody>, RouterError> {
    let worker = named(app, path)?;
    Ok(json_response(StatusCode::OK, &entry(&worker)))
}

/// `DELETE /workers/{id}` (or the url, percent-encoded).
pub fn delete(app: &App, path: &str) -> Result<Response<RouterBody>, RouterError> {
    let worker = named(app, path)?;
    unregister(app, worker.url())?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "status": "success",
            "id": worker.id(),
            "url": worker.url(),
            "removed": worker.url(),
            "message": format!("Worker {} removed", worker.url()),
        }),
    ))
}

/// Registers `raw` as `kind`, or finds it registered as `kind` already. A new worker, or a
/// dead one that registers again, is probed at once instead of at the next round.
pub async fn register(
    app: &App,
    raw: &str,
    kind: WorkerType,
) -> Result<std::sync::Arc<Worker>, RouterError> {
    let url = WorkerUrl::parse(raw).map_err(RouterError::BadRequest)?;
    app.worker_hosts()
        .check(url.host(), &url.addresses().await)
        .map_err(RouterError::Forbidden)?;
    let (worker, added) = app.pool().add(url, kind).map_err(|existing| {
        RouterError::Conflict(format!(
            "worker {} is registered as {}; remove it before registering it as {}",
            existing.url(),
            describe(existing.kind()),
            describe(kind)
        ))
    })?;
    if added {
        tracing::info!(
            worker = worker.url(),
            id = worker.id(),
            kind = kind.name(),
            "worker added"
        );
    }
    // A new worker is probed at once for its weight version, a dead one to revive it.
    if added || !worker.is_live() {
        app.probe_now().request(worker.clone());
    }
    Ok(worker)
}

/// Unregisters the worker at `raw`; its requests in flight finish normally.
pub fn unregister(app: &App, raw: &str) -> Result<String, RouterError> {
    let url = canonical(raw)?;
    if !app.pool().remove(&url) {
        return Err(not_found(&url));
    }
    tracing::info!(worker = %url, "worker removed");
    Ok(url)
}

/// The canonical spelling of a worker url.
pub fn canonical(raw: &str) -> Result<String, RouterError> {
    WorkerUrl::parse(raw)
        .map(|u| u.as_str().to_owned())
        .map_err(RouterError::BadRequest)
}

/// 404 for a worker that is not registered.
pub fn not_found(name: &str) -> RouterError {
    RouterError::NotFound(format!("Worker {name} not found"))
}

/// The worker a `/workers/{...}` path names: by id first, else by (encoded) url.
fn named(app: &App, path: &str) -> Result<std::sync::Arc<Worker>, RouterError> {
    let name = worker_in_path(path)?;
    if let Some(worker) = app.pool().find_id(&name) {
        return Ok(worker);
    }
    let url = WorkerUrl::parse(&name).map_err(|_| not_found(&name))?;
    app.pool()
        .find(url.as_str())
        .ok_or_else(|| not_found(url.as_str()))
}

fn worker_type(body: &serde_json::Map<String, Value>) -> Result<WorkerType, RouterError> {
    let name = match body.get("worker_type") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => Some(name.as_str()),
        Some(other) => {
            return Err(RouterError::BadRequest(format!(
                "worker_type must be a string, got {other}"
            )));
        }
    };
    let port = match body.get("bootstrap_port") {
        None | Some(Value::Null) => None,
        Some(value) => Some(
            value
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .filter(|&p| p > 0)
                .ok_or_else(|| {
                    RouterError::BadRequest(format!(
                        "bootstrap_port must be a port number (1-65535), got {value}"
                    ))
                })?,
        ),
    };
    WorkerType::parse(name, port).map_err(RouterError::BadRequest)
}

fn describe(kind: WorkerType) -> String {
    match kind {
        WorkerType::Prefill {
            bootstrap_port: Some(port),
        } => format!("prefill with bootstrap_port {port}"),
        other => other.name().to_owned(),
    }
}

/// One worker as `GET /workers` lists it. `load` is SGLang router's name for
/// `active_requests`; both are kept.
fn entry(worker: &Worker) -> Value {
    let mut entry = json!({
        "id": worker.id(),
        "url": worker.url(),
        "worker_type": worker.kind().name(),
        "is_healthy": worker.is_live(),
        "active_requests": worker.in_flight(),
        "load": worker.in_flight(),
    });
    entry["weight_version"] = json!(worker.weight_version().as_deref());
    entry["is_paused"] = json!(worker.is_paused());
    if let WorkerType::Prefill { bootstrap_port } = worker.kind() {
        entry["bootstrap_port"] = json!(bootstrap_port);
    }
    entry
}
