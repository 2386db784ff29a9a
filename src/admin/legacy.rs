//! SlimeRouter's worker endpoints, for older slime: `POST /add_worker`, `POST /remove_worker`
//! and `GET /list_workers`. Their workers are regular ones.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::json;

use super::input::url_from_request;
use super::workers::{register, unregister};
use crate::app::App;
use crate::body::RouterBody;
use crate::error::{RouterError, json_response};
use crate::pool::Pool;
use crate::worker::WorkerType;

/// `POST /add_worker?url=U` (or `worker_url`, or a JSON body): re-adding is a no-op.
pub async fn add(app: &App, req: Request<Incoming>) -> Result<Response<RouterBody>, RouterError> {
    let url = url_from_request(req).await?;
    register(app, &url, WorkerType::Regular).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"status": "success", "worker_urls": WorkerCounts(app.pool())}),
    ))
}

/// `POST /remove_worker?url=U`.
pub async fn remove(
    app: &App,
    req: Request<Incoming>,
) -> Result<Response<RouterBody>, RouterError> {
    let url = url_from_request(req).await?;
    let removed = unregister(app, &url)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"status": "success", "removed": removed, "worker_urls": urls(app)}),
    ))
}

/// `GET /list_workers`: `{"urls": [...]}`, dead workers included.
pub fn list(app: &App) -> Response<RouterBody> {
    json_response(StatusCode::OK, &json!({ "urls": urls(app) }))
}

fn urls(app: &App) -> Vec<String> {
    let workers = app.pool().snapshot();
    workers.iter().map(|w| w.url().to_owned()).collect()
}

/// `{"url": in-flight, ...}` in registration order, dead workers included (SlimeRouter's shape).
struct WorkerCounts<'a>(&'a Pool);

impl Serialize for WorkerCounts<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let workers = self.0.snapshot();
        serializer.collect_map(workers.iter().map(|w| (w.url(), w.in_flight())))
    }
}
