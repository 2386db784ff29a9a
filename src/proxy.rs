//! Forwarding to workers: request bytes forwarded as received, response bytes streamed back
//! untouched, at most `--slime-router-max-connections` at once across threads. A worker that
//! fails before answering counts against itself and the request moves to another.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::body::Lease;
use crate::error::RouterError;
use crate::policy::{RouteHint, Routing};
use crate::pool::{NoPick, Pool};
use crate::rids::{RidGuard, RidList, Rids};
use crate::upstream::{Conn, ConnectError, Connections};
use crate::worker::{InFlight, Role, Transition, Tried, Worker};

/// How long a request waits for a worker at an allowed weight version when
/// `--slime-router-timeout` is not set.
const VERSION_WAIT: Duration = Duration::from_secs(600);

/// How often a request waiting for a weight version looks again, besides being woken: a
/// wake-up that comes between its look and its wait would otherwise be missed.
const VERSION_RECHECK: Duration = Duration::from_millis(200);

/// What to send; built once per client request, reused across attempts.
#[derive(Clone)]
pub struct Outbound {
    pub method: Method,
    pub path: PathAndQuery,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub hint: Option<RouteHint>,
    /// The rids a generation body names, registered while it is in flight.
    pub rids: Option<RidList>,
}

/// A worker's response head and the lease its body must carry.
pub struct Answer {
    pub response: Response<Incoming>,
    pub lease: Lease,
}

/// How one attempt on one worker failed.
pub enum Failure {
    /// Nothing reached the worker.
    Connect(String),
    /// The router itself ran out of file descriptors or buffers: not the worker's fault.
    Local(String),
    /// The request may have reached the worker, which then failed without answering. It may
    /// have run there (a generation, a weight update), so it is never sent again.
    Unanswered(String),
    /// Sent on a reused idle connection that ended (closed or reset) before any byte of an
    /// answer: most often the worker had closed it while idle, so the request never ran. It
    /// may go once more, to another worker.
    Stale(String),
    /// The worker answered with something no client may be given (an unasked `101`).
    Invalid(String),
    Timeout,
}

impl Failure {
    /// The client's error for this failure on the worker at `url`.
    pub fn into_error(self, url: &str, timeout: Option<Duration>) -> RouterError {
        let url = url.to_owned();
        match self {
            Self::Timeout => RouterError::Timeout {
                url,
                secs: timeout.map_or(0.0, |t| t.as_secs_f64()),
            },
            Self::Connect(reason) => RouterError::Connect { url, reason },
            Self::Local(reason) => RouterError::Exhausted { url, reason },
            Self::Unanswered(reason) | Self::Stale(reason) | Self::Invalid(reason) => {
                RouterError::Upstream { url, reason }
            }
        }
    }
}

impl From<ConnectError> for Failure {
    fn from(error: ConnectError) -> Self {
        match error.local {
            true => Self::Local(error.reason),
            false => Self::Connect(error.reason),
        }
    }
}

/// How a proxy reaches its workers.
#[derive(Clone, Copy)]
pub struct Limits {
    /// Connections across all threads (`--slime-router-max-connections`).
    pub capacity: u32,
    /// `--slime-router-timeout`, for the response head and between body chunks.
    pub timeout: Option<Duration>,
    /// `--connect-timeout-secs`.
    pub connect_timeout: Duration,
    /// `--slime-router-health-check-failure-threshold`.
    pub failure_threshold: u32,
}

/// One serving thread's way to the workers.
#[derive(Clone)]
pub struct Proxy {
    connections: Arc<Connections>,
    permits: Arc<Semaphore>,
    /// How many permits `permits` started with.
    capacity: u32,
    timeout: Option<Duration>,
    failure_threshold: u32,
    rids: Arc<Rids>,
}

impl Proxy {
    /// A proxy for one serving thread; `permits` bounds connections across all threads, and
    /// `rids` is the router's table of rids in flight.
    pub fn new(permits: Arc<Semaphore>, limits: Limits, rids: Arc<Rids>) -> Self {
        Self {
            connections: Arc::new(Connections::new(limits.connect_timeout)),
            permits,
            capacity: limits.capacity,
            timeout: limits.timeout,
            failure_threshold: limits.failure_threshold,
            rids,
        }
    }

    /// Registers `out`'s rids on `workers` until the guard drops.
    pub fn register_rids(&self, out: &Outbound, workers: &[&Arc<Worker>]) -> Option<RidGuard> {
        Some(self.rids.register(out.rids.as_ref()?, workers))
    }

    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Removes what describes the client's connection rather than the request; each worker
    /// request gets its own Host and framing.
    pub fn prepare(out: &mut Outbound) {
        strip_hop_by_hop(&mut out.headers);
        out.headers.remove(header::HOST);
        out.headers.remove(header::CONTENT_LENGTH);
    }

    /// `n` of the `--slime-router-max-connections` permits, at most all of them.
    pub async fn permits(&self, n: u32) -> Result<OwnedSemaphorePermit, RouterError> {
        self.permits
            .clone()
            .acquire_many_owned(n.min(self.capacity))
            .await
            .map_err(|_| RouterError::ShuttingDown)
    }

    /// Waits for a worker at an allowed weight version (an update reported, a worker added or
    /// revived) until `deadline`, which the first wait sets from the response timeout or
    /// [`VERSION_WAIT`].
    pub async fn await_version(
        &self,
        pool: &Pool,
        deadline: &mut Option<tokio::time::Instant>,
    ) -> Result<(), RouterError> {
        let limit = self.timeout.unwrap_or(VERSION_WAIT);
        let end = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + limit);
        let now = tokio::time::Instant::now();
        if now >= end {
            return Err(RouterError::NoCurrentWorker {
                secs: limit.as_secs_f64(),
            });
        }
        let wait = (end - now).min(VERSION_RECHECK);
        let _ = tokio::time::timeout(wait, pool.versions().changed()).await;
        Ok(())
    }

    /// Counts a failed attempt against its worker, which may take it out of routing.
    pub fn count_failure(&self, worker: &Worker) {
        worker.counters().failures.inc();
        if worker.record_failure(self.failure_threshold) == Some(Transition::Died) {
            tracing::warn!(worker = worker.url(), "worker DEAD after repeated failures");
        }
    }

    /// Sends `out` to the best live worker, moving to another when one fails before
    /// answering.
    pub async fn send(&self, pool: &Pool, out: &mut Outbound) -> Result<Answer, RouterError> {
        Self::prepare(out);
        let permit = self.permits(1).await?;
        let mut tried = Tried::default();
        let mut last_error = RouterError::NoLiveWorker;
        let mut resent = false;
        let mut version_deadline = None;
        loop {
            let routing = Routing {
                path: out.path.path(),
                headers: &out.headers,
                body: &out.body,
            };
            let slot = match pool.pick(&routing, out.hint.as_ref(), &tried, Role::Regular) {
                Ok(slot) => slot,
                Err(NoPick::Version) => {
                    self.await_version(pool, &mut version_deadline).await?;
                    continue;
                }
                Err(NoPick::NoWorker) => break,
            };
            let rids = self.register_rids(out, &[slot.worker()]);
            let failure = match self.attempt(out, &slot).await {
                Ok((response, conn)) => {
                    let lease = Lease::new(slot, permit, conn).with_rids(rids);
                    return Ok(Answer { response, lease });
                }
                Err(failure) => failure,
            };
            let worker = slot.worker().clone();
            if let Failure::Local(_) = failure {
                tracing::warn!(
                    worker = worker.url(),
                    "router out of resources; worker not blamed"
                );
                return Err(failure.into_error(worker.url(), self.timeout));
            }
            let kind = Retry::of(&failure);
            // Only failures to reach or hear from a worker can take it out of routing.
            let blames = matches!(failure, Failure::Connect(_) | Failure::Unanswered(_));
            last_error = failure.into_error(worker.url(), self.timeout);
            match kind {
                Retry::Never if blames => {
                    self.count_failure(&worker);
                    return Err(last_error);
                }
                Retry::Never => {
                    worker.counters().failures.inc();
                    return Err(last_error);
                }
                Retry::Counted => self.count_failure(&worker),
                Retry::Once if resent => return Err(last_error),
                Retry::Once => resent = true,
            }
            tracing::warn!(error = %last_error, "retrying on another worker");
            tried.insert(&worker);
        }
        Err(last_error)
    }

    /// One request on the worker of `slot`, under the response timeout unless the worker is
    /// paused (it queues requests then, as it was told to).
    pub async fn attempt(
        &self,
        out: &Outbound,
        slot: &InFlight,
    ) -> Result<(Response<Incoming>, Conn), Failure> {
        let worker = slot.worker();
        worker.counters().requests.inc();
        // Connecting has its own timeout: a worker that cannot be reached is another
        // worker's request, not a response timeout.
        let conn = self.connections.get(worker).await?;
        let call = self.exchange(worker, out, conn);
        let (mut response, conn) = match self.timeout.filter(|_| !worker.is_paused()) {
            Some(limit) => tokio::time::timeout(limit, call)
                .await
                .map_err(|_| Failure::Timeout)??,
            None => call.await?,
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Failure::Invalid(
                "answered 101 Switching Protocols, which no request asked for".into(),
            ));
        }
        framed_once(response.headers_mut());
        strip_hop_by_hop(response.headers_mut());
        Ok((response, conn))
    }

    /// One request on one worker. A reused connection may have been closed by the worker
    /// meanwhile: a request it did not take goes on a fresh connection, and one it took but
    /// never answered is [`Failure::Stale`], for another worker.
    async fn exchange(
        &self,
        worker: &Worker,
        out: &Outbound,
        mut conn: Conn,
    ) -> Result<(Response<Incoming>, Conn), Failure> {
        let mut request = outbound_request(worker, out);
        if conn.reused {
            match conn.sender.try_send_request(request).await {
                Ok(response) => return Ok((response, conn)),
                Err(mut error) => {
                    tracing::debug!(worker = worker.url(), error = %error.error(), "stale connection");
                    request = match error.take_message() {
                        Some(unsent) => unsent,
                        None if ended_unanswered(error.error()) => {
                            return Err(Failure::Stale(error_chain(error.error())));
                        }
                        None => return Err(Failure::Unanswered(error_chain(error.error()))),
                    };
                    conn = self.connections.connect(worker).await?;
                }
            }
        }
        match conn.sender.send_request(request).await {
            Ok(response) => Ok((response, conn)),
            Err(e) => Err(Failure::Unanswered(error_chain(&e))),
        }
    }
}

/// Whether a connection ended before any byte of an answer: an EOF (the worker closed it as
/// the request went out) or a reset (its socket closed with the request unread).
fn ended_unanswered(error: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
            return matches!(io.kind(), ConnectionReset | ConnectionAborted | BrokenPipe);
        }
        source = cause.source();
    }
    error.is_incomplete_message()
}

/// A worker answer framed both ways: chunked wins and the length goes (RFC 9112 §6.3), as
/// hyper read it; relayed, the stale length would cut the client's body short.
fn framed_once(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
}

/// What a failed attempt allows.
enum Retry {
    /// Nothing was sent (a refused or timed-out connect): another worker, as many as live,
    /// and the failure counts against this one.
    Counted,
    /// [`Failure::Stale`]: one more worker at most, not counted (the worker is fine).
    Once,
    /// The worker may have run it, or answered what no client may get: the client hears.
    Never,
}

impl Retry {
    fn of(failure: &Failure) -> Self {
        match failure {
            Failure::Connect(_) => Self::Counted,
            Failure::Stale(_) => Self::Once,
            Failure::Local(_) | Failure::Unanswered(_) | Failure::Invalid(_) | Failure::Timeout => {
                Self::Never
            }
        }
    }
}

fn outbound_request(worker: &Worker, out: &Outbound) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(out.body.clone()));
    *request.method_mut() = out.method.clone();
    // HTTP/1.1 origin form ("/path?query"), with the worker as Host, like a direct call.
    *request.uri_mut() = Uri::from(out.path.clone());
    *request.headers_mut() = out.headers.clone();
    request
        .headers_mut()
        .insert(header::HOST, worker.host_header().clone());
    request
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection, not the message, so a
/// proxy must not forward them; `Connection` may name more. Checked in one pass first,
/// since nearly every message carries none.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
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
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name))
        .cloned()
        .collect();
    for name in hop {
        headers.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "expect"
    )
}

/// An error and its causes, as one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
