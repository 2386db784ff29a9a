//! The RL loop's control calls, which the router fans out to its workers in one call: abort
//! (only to the workers running the named rids when the router knows them), pause and
//! continue, cache flushes, weight updates and memory release. They run on a client of their
//! own with `--control-timeout-secs`, never on the proxy's connections, and one at a time:
//! a second control call waits for the first, so two updates never interleave on a worker.
//! Aborts do not wait, since they are what ends a stuck step.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::task::JoinSet;

use crate::body::RouterBody;
use crate::error::{RouterError, json_response};
use crate::health;
use crate::json::Object;
use crate::pool::Pool;
use crate::proxy::{Outbound, error_chain};
use crate::rids::{self, Rids};
use crate::worker::{Worker, WorkerUrl};

/// The field, in a query or a JSON body, that narrows a call to some workers; the router
/// removes it before forwarding, since workers do not know it.
const SELECT: &str = "worker_urls";

/// What a worker's 2xx answer to a call changes in the router's view of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    None,
    /// Generation paused (true) or continued (false) there.
    Pause(bool),
    /// It runs new weights: the version the call names, else what it reports.
    Weights,
}

const CALLS: &[(&str, Effect)] = &[
    ("/pause_generation", Effect::Pause(true)),
    ("/continue_generation", Effect::Pause(false)),
    ("/flush_cache", Effect::None),
    ("/update_weights_from_disk", Effect::Weights),
    ("/update_weights_from_distributed", Effect::Weights),
    ("/update_weights_from_tensor", Effect::Weights),
    ("/init_weights_update_group", Effect::None),
    ("/release_memory_occupation", Effect::None),
    ("/resume_memory_occupation", Effect::None),
];

/// A control endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    effect: Effect,
    abort: bool,
}

/// The control endpoint at `path`, if it is one.
pub fn endpoint(path: &str) -> Option<Endpoint> {
    if path == "/abort_request" {
        return Some(Endpoint {
            effect: Effect::None,
            abort: true,
        });
    }
    let (_, effect) = CALLS.iter().find(|(p, _)| *p == path)?;
    Some(Endpoint {
        effect: *effect,
        abort: false,
    })
}

/// The router's control plane: its client, its one-at-a-time turn, and the rids in flight.
pub struct Control {
    client: reqwest::Client,
    timeout: Duration,
    turn: Mutex<()>,
    rids: Arc<Rids>,
}

impl Control {
    /// A control plane whose calls may take `timeout` per worker.
    pub fn new(timeout: Duration) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .no_proxy()
            .build()?;
        Ok(Self {
            client,
            timeout,
            turn: Mutex::new(()),
            rids: Arc::default(),
        })
    }

    /// The rids in flight, which the proxy registers.
    pub fn rids(&self) -> &Arc<Rids> {
        &self.rids
    }

    /// Sends the call `out` to its workers and reports each one's answer: 200 when all
    /// answered 2xx, else the first failure's status, with the same per-worker list.
    pub async fn serve(
        &self,
        pool: &Pool,
        endpoint: Endpoint,
        out: &Outbound,
    ) -> Result<Response<RouterBody>, RouterError> {
        let call = Call::parse(out)?;
        let targets = match (&call.selected, endpoint.abort) {
            (Some(urls), _) => named(pool, urls)?,
            (None, true) => self.abort_targets(pool, &out.body),
            (None, false) => live(pool),
        };
        if targets.is_empty() {
            return Err(RouterError::NoLiveWorker);
        }
        let _turn = match endpoint.abort {
            true => None,
            false => Some(self.turn.lock().await),
        };
        let before = pause_ahead(endpoint.effect, &targets);
        let results = self.fan_out(&targets, &call).await;
        for ((worker, result), was_paused) in targets.iter().zip(&results).zip(before) {
            if result.ok() {
                self.apply(endpoint.effect, worker, &call).await;
            } else if let Some(was_paused) = was_paused {
                worker.set_paused(was_paused);
            }
        }
        Ok(report(&results))
    }

    /// The workers running the rids an abort names, when the router knows them all; every
    /// live worker for `abort_all`, an unknown rid or no rid.
    fn abort_targets(&self, pool: &Pool, body: &[u8]) -> Vec<Arc<Worker>> {
        let known = rids::of_body(body).and_then(|rids| self.rids.workers(&rids));
        match known {
            Some(workers) if !workers.is_empty() && !abort_all(body) => workers,
            _ => live(pool),
        }
    }

    async fn fan_out(&self, targets: &[Arc<Worker>], call: &Call) -> Vec<Report> {
        let mut calls = JoinSet::new();
        for (at, worker) in targets.iter().enumerate() {
            let (request, url) = (self.request(worker, call), worker.url().to_owned());
            let secs = self.timeout.as_secs_f64();
            calls.spawn(async move { (at, Report::of(url, request.send().await, secs).await) });
        }
        let mut results: Vec<Option<Report>> = targets.iter().map(|_| None).collect();
        while let Some(joined) = calls.join_next().await {
            if let Ok((at, report)) = joined {
                results[at] = Some(report);
            }
        }
        results
            .into_iter()
            .zip(targets)
            .map(|(report, worker)| {
                report.unwrap_or_else(|| Report::failed(worker.url(), 502, "call failed".into()))
            })
            .collect()
    }

    fn request(&self, worker: &Worker, call: &Call) -> reqwest::RequestBuilder {
        let url = format!("{}{}", worker.url(), call.path_and_query);
        let mut request = self.client.request(call.method.clone(), url);
        if let Some(content_type) = call.headers.get(header::CONTENT_TYPE) {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        if let Some(auth) = call.headers.get(header::AUTHORIZATION) {
            request = request.header(header::AUTHORIZATION, auth);
        }
        request.body(call.body.clone())
    }

    async fn apply(&self, effect: Effect, worker: &Worker, call: &Call) {
        match effect {
            Effect::None => {}
            Effect::Pause(paused) => {
                worker.set_paused(paused);
                tracing::info!(worker = worker.url(), paused, "generation pause changed");
            }
            Effect::Weights => {
                let version = match &call.version {
                    Some(version) => Some(version.clone()),
                    None => health::read_version(&self.client, worker).await,
                };
                if let Some(version) = version {
                    tracing::info!(worker = worker.url(), %version, "weights updated");
                    worker.observe_version(&version);
                }
            }
        }
    }
}

/// Marks the targets of a pause paused before the call goes out, and returns what each was.
/// An engine stops generating as soon as it reads the call, before the router hears back;
/// a health probe failing in that gap would otherwise count, and could take it out of
/// routing while paused. A worker whose call fails gets its old state back.
fn pause_ahead(effect: Effect, targets: &[Arc<Worker>]) -> Vec<Option<bool>> {
    targets
        .iter()
        .map(|worker| {
            (effect == Effect::Pause(true)).then(|| {
                let was = worker.is_paused();
                worker.set_paused(true);
                was
            })
        })
        .collect()
}

fn live(pool: &Pool) -> Vec<Arc<Worker>> {
    pool.snapshot()
        .iter()
        .filter(|w| w.is_live())
        .cloned()
        .collect()
}

/// The registered workers at `urls`, live or not (the caller asked for them); 404 naming the
/// first that is not registered.
fn named(pool: &Pool, urls: &[String]) -> Result<Vec<Arc<Worker>>, RouterError> {
    let mut workers: Vec<Arc<Worker>> = Vec::new();
    for raw in urls {
        let url = WorkerUrl::parse(raw).map_err(RouterError::BadRequest)?;
        let worker = pool.find(url.as_str()).ok_or_else(|| {
            RouterError::NotFound(format!(
                "{SELECT}: no worker {} is registered",
                url.as_str()
            ))
        })?;
        if !workers.iter().any(|w| Arc::ptr_eq(w, &worker)) {
            workers.push(worker);
        }
    }
    Ok(workers)
}

fn abort_all(body: &[u8]) -> bool {
    Object::parse(body)
        .ok()
        .and_then(|object| object.get("abort_all").map(|v| v.get() == "true"))
        .unwrap_or(false)
}

/// One control call as the workers get it: `worker_urls` taken out of its query and body.
struct Call {
    method: Method,
    path_and_query: String,
    headers: HeaderMap,
    body: Bytes,
    selected: Option<Vec<String>>,
    /// The `weight_version` an update names.
    version: Option<String>,
}

impl Call {
    fn parse(out: &Outbound) -> Result<Self, RouterError> {
        let (path_and_query, mut selected) = split_query(out.path.path(), out.path.query());
        let mut body = out.body.clone();
        let mut version = None;
        if !body.iter().all(u8::is_ascii_whitespace) {
            let mut object = Object::parse(&out.body).map_err(|e| {
                RouterError::BadRequest(format!("a control call's body must be a JSON object: {e}"))
            })?;
            version = object.get("weight_version").and_then(|raw| {
                match serde_json::from_str::<Value>(raw.get()).ok()? {
                    Value::String(v) => Some(v),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                }
            });
            if let Some(raw) = object.get(SELECT) {
                let urls = url_list(raw.get())?;
                selected.get_or_insert_with(Vec::new).extend(urls);
                object.remove(SELECT);
                body = Bytes::from(object.to_bytes());
            }
        }
        Ok(Self {
            method: out.method.clone(),
            path_and_query,
            headers: out.headers.clone(),
            body,
            selected,
            version,
        })
    }
}

/// `worker_urls` as a JSON list of strings or one string.
fn url_list(raw: &str) -> Result<Vec<String>, RouterError> {
    match serde_json::from_str::<Value>(raw) {
        Ok(Value::String(url)) => Ok(vec![url]),
        Ok(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(url) => Ok(url),
                _ => Err(()),
            })
            .collect::<Result<_, _>>()
            .map_err(|()| RouterError::BadRequest(format!("{SELECT} must be a list of urls"))),
        _ => Err(RouterError::BadRequest(format!(
            "{SELECT} must be a list of urls"
        ))),
    }
}

/// The path with `worker_urls` taken out of its query (repeated, or comma-separated), and
/// the urls it named.
fn split_query(path: &str, query: Option<&str>) -> (String, Option<Vec<String>>) {
    let Some(query) = query else {
        return (path.to_owned(), None);
    };
    let mut selected: Option<Vec<String>> = None;
    let mut kept = url::form_urlencoded::Serializer::new(String::new());
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        if key == SELECT {
            let urls = value.split(',').map(str::trim).filter(|u| !u.is_empty());
            selected
                .get_or_insert_with(Vec::new)
                .extend(urls.map(str::to_owned));
        } else {
            kept.append_pair(&key, &value);
        }
    }
    let kept = kept.finish();
    match kept.is_empty() {
        true => (path.to_owned(), selected),
        false => (format!("{path}?{kept}"), selected),
    }
}

/// One worker's answer to a control call, as the router reports it.
struct Report {
    status: u16,
    entry: Value,
}

impl Report {
    async fn of(url: String, sent: Result<reqwest::Response, reqwest::Error>, secs: f64) -> Self {
        let failed = |e: reqwest::Error| match e.is_timeout() {
            true => Self::failed(
                &url,
                504,
                format!("no answer within {secs}s (--control-timeout-secs)"),
            ),
            false => Self::failed(&url, 502, error_chain(&e)),
        };
        let response = match sent {
            Ok(response) => response,
            Err(e) => return failed(e),
        };
        let status = response.status().as_u16();
        match response.bytes().await {
            // A worker's JSON answer stays JSON; anything else is kept as text.
            Ok(bytes) => {
                let body = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
                let entry = json!({"url": url, "status": status, "body": body});
                Self { status, entry }
            }
            Err(e) => failed(e),
        }
    }

    fn failed(url: &str, status: u16, error: String) -> Self {
        let entry = json!({"url": url, "status": status, "error": error});
        Self { status, entry }
    }

    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

fn report(results: &[Report]) -> Response<RouterBody> {
    let entries: Vec<&Value> = results.iter().map(|r| &r.entry).collect();
    let failed = results.iter().filter(|r| !r.ok()).count();
    match results.iter().find(|r| !r.ok()) {
        None => json_response(
            StatusCode::OK,
            &json!({"status": "success", "results": entries}),
        ),
        Some(first) => {
            let status = StatusCode::from_u16(first.status).unwrap_or(StatusCode::BAD_GATEWAY);
            let error = format!("{failed} of {} workers failed", results.len());
            json_response(status, &json!({"error": error, "results": entries}))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_urls_leave_the_query() {
        let (path, urls) = split_query("/flush_cache", Some("worker_urls=http://a:1,http://b:2"));
        assert_eq!(path, "/flush_cache");
        assert_eq!(urls.unwrap(), ["http://a:1", "http://b:2"]);
        let (path, urls) = split_query("/x", Some("keep=1&worker_urls=http%3A%2F%2Fa%3A1"));
        assert_eq!(path, "/x?keep=1");
        assert_eq!(urls.unwrap(), ["http://a:1"]);
        assert_eq!(split_query("/x", None), ("/x".to_owned(), None));
    }

    #[test]
    fn endpoints_and_effects() {
        assert!(endpoint("/abort_request").is_some_and(|e| e.abort));
        assert_eq!(
            endpoint("/pause_generation").map(|e| e.effect),
            Some(Effect::Pause(true))
        );
        assert!(endpoint("/generate").is_none());
        assert!(abort_all(br#"{"abort_all": true}"#));
        assert!(!abort_all(br#"{"abort_all": false, "rid": "x"}"#));
    }
}
