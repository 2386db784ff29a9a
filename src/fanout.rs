//! Endpoints sent to every live worker: slime aborts all in-flight generation at the end
//! of each rollout with `/abort_request`, and `/flush_cache` must reach every cache.

use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{Response, StatusCode};
use serde_json::json;
use tokio::task::JoinSet;

use crate::body::RouterBody;
use crate::error::{RouterError, json_response};
use crate::pool::Pool;
use crate::proxy::{Outbound, Proxy, strip_hop_by_hop};

pub fn is_fanout(path: &PathAndQuery) -> bool {
    matches!(path.path(), "/abort_request" | "/flush_cache")
}

/// Sends `out` to every live worker and waits for all: 200 when all answered 2xx, else the
/// first failure's status; the body lists each worker's result.
pub async fn broadcast(
    pool: &Pool,
    proxy: &Proxy,
    out: &mut Outbound,
) -> Result<Response<RouterBody>, RouterError> {
    strip_hop_by_hop(&mut out.headers);
    out.headers.remove(http::header::HOST);
    out.headers.remove(http::header::CONTENT_LENGTH);
    let request = Arc::new(Outbound {
        method: out.method.clone(),
        path: out.path.clone(),
        headers: out.headers.clone(),
        body: out.body.clone(),
        hint: None,
    });
    let workers: Vec<_> = pool
        .snapshot()
        .iter()
        .filter(|w| w.is_live())
        .cloned()
        .collect();
    if workers.is_empty() {
        return Err(RouterError::NoLiveWorker);
    }
    let mut calls = JoinSet::new();
    for (index, worker) in workers.into_iter().enumerate() {
        let (proxy, request) = (proxy.clone(), request.clone());
        calls.spawn(async move {
            let result = proxy.send_to(&worker, &request).await;
            (index, worker.url().to_owned(), result)
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = calls.join_next().await {
        if let Ok(result) = joined {
            results.push(result);
        }
    }
    results.sort_by_key(|(index, _, _)| *index);
    let mut first_failure = None;
    let entries: Vec<_> = results
        .into_iter()
        .map(|(_, url, result)| match result {
            Ok((status, body)) => {
                if !(200..300).contains(&status) && first_failure.is_none() {
                    first_failure = StatusCode::from_u16(status).ok();
                }
                let body = String::from_utf8_lossy(&body).into_owned();
                json!({"url": url, "status": status, "body": body})
            }
            Err(error) => {
                first_failure.get_or_insert(StatusCode::BAD_GATEWAY);
                json!({"url": url, "status": 502, "error": error})
            }
        })
        .collect();
    Ok(match first_failure {
        None => json_response(
            StatusCode::OK,
            &json!({"status": "success", "results": entries}),
        ),
        Some(status) => {
            let failed = entries
                .iter()
                .filter(|e| {
                    e["status"]
                        .as_u64()
                        .is_none_or(|s| !(200..300).contains(&s))
                })
                .count();
            let error = format!("{failed} of {} workers failed", entries.len());
            json_response(status, &json!({"error": error, "results": entries}))
        }
    })
}
