//! Forwarding to workers: one pooled hyper client bounded by `--slime-router-max-connections`,
//! request bytes forwarded as received, response bytes streamed back untouched. A worker
//! that fails before answering counts against itself and the request moves to another.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

use crate::body::Lease;
use crate::error::RouterError;
use crate::pool::{InFlight, Pool, RouteHint, Transition, Worker};

/// Bounds connecting to a worker that silently drops packets.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts for a request whose worker failed after it was sent (connect failures, where
/// nothing was sent, may try every live worker).
const MAX_SENT_ATTEMPTS: usize = 2;

/// What to send; built once per client request, reused across attempts.
pub struct Outbound {
    pub method: Method,
    pub path: PathAndQuery,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub hint: Option<RouteHint>,
}

/// A worker's response head and the lease its body must carry.
pub struct Answer {
    pub response: Response<Incoming>,
    pub lease: Lease,
}

enum Failure {
    /// Nothing reached the worker.
    Connect(String),
    /// The request may have reached the worker, which then failed without answering.
    Unanswered(String),
    Timeout,
}

#[derive(Clone)]
pub struct Proxy {
    client: Client<HttpConnector, Full<Bytes>>,
    permits: Arc<Semaphore>,
    timeout: Option<Duration>,
    failure_threshold: u32,
}

impl Proxy {
    /// A client for one serving thread; `permits` bounds connections across all threads.
    pub fn new(permits: Arc<Semaphore>, timeout: Option<Duration>, failure_threshold: u32) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(permits.available_permits())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Self {
            client,
            permits,
            timeout,
            failure_threshold,
        }
    }

    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Sends `out` to the best live worker, moving to another when one fails before
    /// answering.
    pub async fn send(&self, pool: &Pool, out: &mut Outbound) -> Result<Answer, RouterError> {
        strip_hop_by_hop(&mut out.headers);
        out.headers.remove(header::HOST);
        out.headers.remove(header::CONTENT_LENGTH);
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| RouterError::ShuttingDown)?;
        let mut tried: Vec<Arc<Worker>> = Vec::new();
        let mut last_error = RouterError::NoLiveWorker;
        let mut sent_attempts = 0;
        while let Some(slot) = pool.pick(out.hint.as_ref(), &tried) {
            let failure = match self.attempt(out, &slot).await {
                Ok(response) => {
                    return Ok(Answer {
                        response,
                        lease: Lease { slot, permit },
                    });
                }
                Err(failure) => failure,
            };
            let worker = slot.worker().clone();
            worker.counters().failures.inc();
            let url = worker.url().to_owned();
            match failure {
                Failure::Timeout => {
                    let secs = self.timeout.map_or(0.0, |t| t.as_secs_f64());
                    return Err(RouterError::Timeout { url, secs });
                }
                Failure::Connect(reason) => {
                    last_error = RouterError::Connect { url, reason };
                }
                Failure::Unanswered(reason) => {
                    sent_attempts += 1;
                    last_error = RouterError::Upstream { url, reason };
                }
            }
            tracing::warn!(error = %last_error, "retrying on another worker");
            if worker.record_failure(self.failure_threshold) == Some(Transition::Died) {
                tracing::warn!(worker = worker.url(), "worker DEAD after repeated failures");
            }
            tried.push(worker);
            if sent_attempts >= MAX_SENT_ATTEMPTS {
                break;
            }
        }
        Err(last_error)
    }

    async fn attempt(
        &self,
        out: &Outbound,
        slot: &InFlight,
    ) -> Result<Response<Incoming>, Failure> {
        let worker = slot.worker();
        worker.counters().requests.inc();
        let mut request = Request::new(Full::new(out.body.clone()));
        *request.method_mut() = out.method.clone();
        *request.uri_mut() = upstream_uri(worker, &out.path);
        *request.headers_mut() = out.headers.clone();
        let call = self.client.request(request);
        let result = match self.timeout {
            Some(limit) => tokio::time::timeout(limit, call)
                .await
                .map_err(|_| Failure::Timeout)?,
            None => call.await,
        };
        let mut response = result.map_err(|e| {
            let reason = error_chain(&e);
            if e.is_connect() {
                Failure::Connect(reason)
            } else {
                Failure::Unanswered(reason)
            }
        })?;
        strip_hop_by_hop(response.headers_mut());
        Ok(response)
    }

    /// Sends `out` to one specific worker, outside the in-flight accounting (fan-out).
    pub async fn send_to(&self, worker: &Worker, out: &Outbound) -> Result<(u16, Bytes), String> {
        use http_body_util::BodyExt;
        let mut request = Request::new(Full::new(out.body.clone()));
        *request.method_mut() = out.method.clone();
        *request.uri_mut() = upstream_uri(worker, &out.path);
        *request.headers_mut() = out.headers.clone();
        let call = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| error_chain(&e))?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| error_chain(&e))?;
            Ok((status, body.to_bytes()))
        };
        match self.timeout {
            Some(limit) => tokio::time::timeout(limit, call)
                .await
                .map_err(|_| "timed out".to_owned())?,
            None => call.await,
        }
    }
}

fn upstream_uri(worker: &Worker, path: &PathAndQuery) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(worker.scheme());
    parts.authority = Some(worker.authority().clone());
    parts.path_and_query = Some(path.clone());
    // Scheme, authority and path were each validated when parsed, so joining them is valid.
    Uri::from_parts(parts).unwrap_or_default()
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection, not the message, so a
/// proxy must not forward them; `Connection` may name more.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::EXPECT,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
