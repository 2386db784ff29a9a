//! One upstream worker: its canonical url, health state and in-flight count, and the
//! [`InFlight`] guard that holds one slot of that count. The guard owns an `Arc` to its worker
//! and travels inside the response body, so stream end, upstream error and client disconnect
//! each release it exactly once.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use http::HeaderValue;
use http::uri::Authority;
use prometheus_client::metrics::histogram::Histogram;

use crate::metrics::WorkerCounters;
use crate::versions::Versions;

/// A worker URL checked to be `http://host:port` and brought to one canonical spelling, so
/// `http://h:1/` and `http://h:1` are the same worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerUrl {
    canonical: String,
    authority: Authority,
    host_header: HeaderValue,
}

impl WorkerUrl {
    /// Parses and canonicalises `raw`; the error names the url and what is wrong with it.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let bad =
            |why: &str| format!("invalid worker url {raw:?}: {why}; expected http://host:port");
        let url = url::Url::parse(raw.trim()).map_err(|e| bad(&e.to_string()))?;
        match url.scheme() {
            "http" => {}
            "https" => return Err(bad("https workers are not supported")),
            _ => return Err(bad("scheme must be http")),
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host"))?;
        // DNS names are at most 253 bytes; a longer one can never resolve.
        if host.len() > 253 {
            return Err(bad("host name longer than 253 bytes"));
        }
        let port = url.port_or_known_default().ok_or_else(|| bad("no port"))?;
        if port == 0 {
            return Err(bad("port 0 is not a port a worker listens on"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad("credentials are not allowed"));
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(bad("path, query and fragment are not allowed"));
        }
        let authority: Authority = format!("{host}:{port}")
            .parse()
            .map_err(|_| bad("bad host"))?;
        let host_header = HeaderValue::from_str(authority.as_str()).map_err(|_| bad("bad host"))?;
        Ok(Self {
            canonical: format!("http://{authority}"),
            authority,
            host_header,
        })
    }

    /// The canonical spelling, `http://host:port`.
    pub fn as_str(&self) -> &str {
        &self.canonical
    }

    /// The host part (IPv6 without brackets).
    pub fn host(&self) -> &str {
        let host = self.authority.host();
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
    }

    /// The addresses the host stands for: itself when it is an address, else what it resolves
    /// to (nothing when it does not resolve; such a worker just fails its health checks).
    pub async fn addresses(&self) -> Vec<std::net::IpAddr> {
        if let Ok(address) = self.host().parse() {
            return vec![address];
        }
        match tokio::net::lookup_host(self.authority.as_str()).await {
            Ok(found) => found.map(|a| a.ip()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// A worker's part in serving: SGLang router's `worker_type`. Prefill and decode workers
/// serve generation in pairs; regular ones alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerType {
    /// Serves whole requests.
    Regular,
    /// Computes prompts and hands their KV cache to a decode worker via its bootstrap server.
    Prefill {
        /// The port of its bootstrap server, when registered with one.
        bootstrap_port: Option<u16>,
    },
    /// Generates from a KV cache a prefill worker sent.
    Decode,
}

/// [`WorkerType`] without its details, to filter workers by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Regular workers.
    Regular,
    /// Prefill workers.
    Prefill,
    /// Decode workers.
    Decode,
}

impl WorkerType {
    /// The type named `name` (`regular` when absent), with a prefill's bootstrap port.
    pub fn parse(name: Option<&str>, bootstrap_port: Option<u16>) -> Result<Self, String> {
        let kind = match name.unwrap_or("regular") {
            "regular" => Self::Regular,
            "prefill" => Self::Prefill { bootstrap_port },
            "decode" => Self::Decode,
            other => {
                return Err(format!(
                    "unknown worker_type {other:?}: expected regular, prefill or decode"
                ));
            }
        };
        if bootstrap_port.is_some() && !matches!(kind, Self::Prefill { .. }) {
            return Err("bootstrap_port is only for prefill workers".to_owned());
        }
        Ok(kind)
    }

    /// `regular`, `prefill` or `decode`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Regular => "regular",
            Self::Prefill { .. } => "prefill",
            Self::Decode => "decode",
        }
    }

    /// The role, without the bootstrap port.
    pub fn role(self) -> Role {
        match self {
            Self::Regular => Role::Regular,
            Self::Prefill { .. } => Role::Prefill,
            Self::Decode => Role::Decode,
        }
    }
}

/// The id `/workers` knows a url by: the same for the same url in every registration and
/// every run (slime pastes it into `DELETE /workers/{id}`), and made of hex digits only, so
/// it needs no encoding in a path. FNV-1a of the canonical url.
pub fn worker_id(url: &WorkerUrl) -> String {
    let hash = url
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    format!("{hash:016x}")
}

/// A health state change worth logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Live to DEAD: taken out of routing.
    Died,
    /// DEAD to live: routed to again.
    Revived,
}

/// One upstream worker.
#[derive(Debug)]
pub struct Worker {
    /// Unique for the process (a re-added url gets a new one); small, so it can index.
    index: usize,
    url: WorkerUrl,
    id: String,
    kind: WorkerType,
    in_flight: AtomicUsize,
    live: AtomicBool,
    consecutive_failures: AtomicU32,
    consecutive_successes: AtomicU32,
    /// Between a `/pause_generation` and a `/continue_generation` that went through the
    /// router: requests queue there, so probes and timeouts do not count against it.
    paused: AtomicBool,
    /// The weight version it reported last (updates, answers, `/get_model_info`).
    weight_version: RwLock<Option<Arc<str>>>,
    versions: Arc<Versions>,
    counters: WorkerCounters,
    latency: Histogram,
}

impl Worker {
    /// A live worker with nothing in flight.
    pub(crate) fn new(
        index: usize,
        url: WorkerUrl,
        kind: WorkerType,
        versions: Arc<Versions>,
        counters: WorkerCounters,
        latency: Histogram,
    ) -> Self {
        Self {
            index,
            id: worker_id(&url),
            url,
            kind,
            in_flight: AtomicUsize::new(0),
            live: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            consecutive_successes: AtomicU32::new(0),
            paused: AtomicBool::new(false),
            weight_version: RwLock::new(None),
            versions,
            counters,
            latency,
        }
    }

    /// Whether generation is paused there (see [`Worker::set_paused`]).
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Records a pause or continue the worker acknowledged.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// The weight version it reported last, if any.
    pub fn weight_version(&self) -> Option<Arc<str>> {
        self.weight_version
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Records the weight version it reports (an update it acknowledged, an answer's
    /// `meta_info.weight_version`, its `/get_model_info`).
    pub fn observe_version(&self, version: &str) {
        let current = self
            .weight_version
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if current.as_deref() == Some(version) {
            return;
        }
        drop(current);
        *self
            .weight_version
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::from(version));
        self.versions.record(version);
    }

    /// The registry of versions it reports to.
    pub fn versions(&self) -> &Versions {
        &self.versions
    }

    /// The canonical url.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// The stable id of `GET /workers`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Regular, prefill (with its bootstrap port) or decode.
    pub fn kind(&self) -> WorkerType {
        self.kind
    }

    /// The host part of its url, as a prefill's `bootstrap_host` (IPv6 without brackets).
    pub fn host(&self) -> &str {
        self.url.host()
    }

    pub(crate) fn worker_url(&self) -> &WorkerUrl {
        &self.url
    }

    /// A small number unique to this registration, for per-worker tables (and [`Tried`]).
    pub fn index(&self) -> usize {
        self.index
    }

    /// `host:port`, to connect to.
    pub fn authority(&self) -> &Authority {
        &self.url.authority
    }

    /// `Host` for requests to this worker, built once.
    pub fn host_header(&self) -> &HeaderValue {
        &self.url.host_header
    }

    /// Requests in flight to it now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether it is routed to (not DEAD).
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Relaxed)
    }

    /// Its request and failure counters.
    pub fn counters(&self) -> &WorkerCounters {
        &self.counters
    }

    /// A failed probe, connect failure or transport error.
    pub fn record_failure(&self, threshold: u32) -> Option<Transition> {
        self.consecutive_successes.store(0, Ordering::Relaxed);
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        (failures >= threshold && self.live.swap(false, Ordering::Relaxed))
            .then_some(Transition::Died)
    }

    /// A successful probe.
    pub fn record_success(&self, threshold: u32) -> Option<Transition> {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.is_live() {
            return None;
        }
        let successes = self.consecutive_successes.fetch_add(1, Ordering::Relaxed) + 1;
        if successes >= threshold && !self.live.swap(true, Ordering::Relaxed) {
            self.consecutive_successes.store(0, Ordering::Relaxed);
            return Some(Transition::Revived);
        }
        None
    }
}

/// Holds one in-flight slot on a worker until dropped; also times the request.
#[derive(Debug)]
pub struct InFlight {
    worker: Arc<Worker>,
    started: Instant,
}

impl InFlight {
    /// Takes a slot on `worker`.
    pub fn take(worker: &Arc<Worker>) -> Self {
        worker.in_flight.fetch_add(1, Ordering::Relaxed);
        Self {
            worker: worker.clone(),
            started: Instant::now(),
        }
    }

    /// The worker this slot is on.
    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.worker.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.worker
            .latency
            .observe(self.started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_urls() {
        let a = WorkerUrl::parse("http://127.0.0.1:8000/").unwrap();
        let b = WorkerUrl::parse(" http://127.0.0.1:8000 ").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.as_str(), "http://127.0.0.1:8000");
        assert_eq!(
            WorkerUrl::parse("http://[::1]:9").unwrap().as_str(),
            "http://[::1]:9"
        );
        for bad in [
            "",
            "127.0.0.1:8000",
            "ftp://h:1",
            "https://h:1",
            "http://h:1/x",
            "http://h:1?q=1",
            "http://u:p@h:1",
            "http://h:0",
        ] {
            assert!(WorkerUrl::parse(bad).is_err(), "{bad} accepted");
        }
        let long = format!("http://{}.example:1", "a".repeat(250));
        assert!(WorkerUrl::parse(&long).is_err(), "a 258-byte host accepted");
    }

    #[test]
    fn ids_are_stable_hex_per_url() {
        let a = WorkerUrl::parse("http://127.0.0.1:8000").unwrap();
        let b = WorkerUrl::parse("http://127.0.0.1:8000/").unwrap();
        let c = WorkerUrl::parse("http://127.0.0.1:8001").unwrap();
        assert_eq!(worker_id(&a), worker_id(&b));
        assert_ne!(worker_id(&a), worker_id(&c));
        assert!(worker_id(&a).bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(worker_id(&a).len(), 16);
    }
}

/// The workers one request has failed on, by [`Worker::index`]: a pick checks each candidate
/// in O(1), so it stays O(workers) however many have failed (a list made a request over
/// 10,000 refusing workers take a minute).
#[derive(Debug, Default)]
pub struct Tried {
    bits: Vec<u64>,
}

impl Tried {
    /// None tried yet.
    pub const fn new() -> Self {
        Self { bits: Vec::new() }
    }

    /// Marks `worker` tried.
    pub fn insert(&mut self, worker: &Worker) {
        let (word, bit) = (worker.index() / 64, worker.index() % 64);
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        self.bits[word] |= 1 << bit;
    }

    /// Whether `worker` was tried.
    pub fn contains(&self, worker: &Worker) -> bool {
        let (word, bit) = (worker.index() / 64, worker.index() % 64);
        self.bits.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }
}
