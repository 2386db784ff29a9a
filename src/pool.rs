//! The workers, their health state, and least-in-flight selection. The in-flight count is
//! held by an [`InFlight`] guard that owns an `Arc` to its worker and travels inside the
//! response body, so stream end, upstream error and client disconnect each release it once.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockWriteGuard};
use std::time::Instant;

use http::HeaderValue;
use http::uri::Authority;
use prometheus_client::metrics::histogram::Histogram;

use crate::metrics::{Metrics, WorkerCounters};

/// A worker URL checked to be `http://host:port` and brought to one canonical spelling, so
/// `http://h:1/` and `http://h:1` are the same worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerUrl {
    canonical: String,
    authority: Authority,
    host_header: HeaderValue,
}

impl WorkerUrl {
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
        let port = url.port_or_known_default().ok_or_else(|| bad("no port"))?;
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

    pub fn as_str(&self) -> &str {
        &self.canonical
    }
}

/// A health state change worth logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Died,
    Revived,
}

/// One upstream worker.
#[derive(Debug)]
pub struct Worker {
    /// Unique for the process (a re-added url gets a new one); small, so it can index.
    id: usize,
    url: WorkerUrl,
    in_flight: AtomicUsize,
    live: AtomicBool,
    consecutive_failures: AtomicU32,
    consecutive_successes: AtomicU32,
    counters: WorkerCounters,
    latency: Histogram,
}

impl Worker {
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    pub fn id(&self) -> usize {
        self.id
    }

    pub fn authority(&self) -> &Authority {
        &self.url.authority
    }

    /// `Host` for requests to this worker, built once.
    pub fn host_header(&self) -> &HeaderValue {
        &self.url.host_header
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Relaxed)
    }

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

/// Steers one pick; never overrides liveness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteHint {
    /// Use this worker when it is live.
    Prefer(String),
    /// The least loaded live worker among these.
    Among(Vec<String>),
}

/// Holds one in-flight slot on a worker until dropped; also times the request.
#[derive(Debug)]
pub struct InFlight {
    worker: Arc<Worker>,
    started: Instant,
}

impl InFlight {
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

/// All registered workers in registration order. Readers take a cheap snapshot; the rare
/// writers (add/remove) swap in a new list.
pub struct Pool {
    workers: RwLock<Arc<[Arc<Worker>]>>,
    metrics: Arc<Metrics>,
}

impl Pool {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            workers: RwLock::new(Arc::from(Vec::new())),
            metrics,
        }
    }

    pub fn snapshot(&self) -> Arc<[Arc<Worker>]> {
        self.workers
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn write(&self) -> RwLockWriteGuard<'_, Arc<[Arc<Worker>]>> {
        self.workers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn find(&self, url: &str) -> Option<Arc<Worker>> {
        self.snapshot().iter().find(|w| w.url() == url).cloned()
    }

    /// Registers `url`; returns the worker and whether it is new. A known url is a no-op.
    pub fn add(&self, url: WorkerUrl) -> (Arc<Worker>, bool) {
        let mut workers = self.write();
        if let Some(existing) = workers.iter().find(|w| w.url == url) {
            return (existing.clone(), false);
        }
        static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
        let worker = Arc::new(Worker {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            counters: self.metrics.worker_counters(url.as_str()),
            latency: self.metrics.latency(),
            url,
            in_flight: AtomicUsize::new(0),
            live: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            consecutive_successes: AtomicU32::new(0),
        });
        let mut next = workers.to_vec();
        next.push(worker.clone());
        *workers = Arc::from(next);
        (worker, true)
    }

    /// Unregisters `url`. Requests in flight to it finish normally.
    pub fn remove(&self, url: &str) -> bool {
        let mut workers = self.write();
        let next: Vec<_> = workers.iter().filter(|w| w.url() != url).cloned().collect();
        if next.len() == workers.len() {
            return false;
        }
        *workers = Arc::from(next);
        drop(workers);
        self.metrics.forget_worker(url);
        true
    }

    /// Takes an in-flight slot on the live worker with the fewest requests in flight, ties
    /// broken at random, skipping `tried`. A hint narrows the choice when it names a live
    /// worker and is ignored otherwise.
    pub fn pick(&self, hint: Option<&RouteHint>, tried: &[Arc<Worker>]) -> Option<InFlight> {
        let workers = self.snapshot();
        let usable = |w: &&Arc<Worker>| w.is_live() && !tried.iter().any(|t| Arc::ptr_eq(t, w));
        let chosen = match hint {
            Some(RouteHint::Prefer(url)) => workers.iter().filter(usable).find(|w| w.url() == url),
            Some(RouteHint::Among(urls)) => least_loaded(
                workers
                    .iter()
                    .filter(usable)
                    .filter(|w| urls.iter().any(|u| u == w.url())),
            ),
            None => None,
        }
        .or_else(|| least_loaded(workers.iter().filter(usable)))?;
        chosen.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(InFlight {
            worker: chosen.clone(),
            started: Instant::now(),
        })
    }
}

/// Least in-flight, ties broken uniformly at random (reservoir sampling over the ties), so
/// light load spreads instead of always landing on the first registered worker.
fn least_loaded<'a>(workers: impl Iterator<Item = &'a Arc<Worker>>) -> Option<&'a Arc<Worker>> {
    let mut best: Option<&Arc<Worker>> = None;
    let (mut best_load, mut ties) = (usize::MAX, 0usize);
    for worker in workers {
        let load = worker.in_flight();
        if load < best_load {
            (best, best_load, ties) = (Some(worker), load, 1);
        } else if load == best_load {
            ties += 1;
            if fastrand::usize(..ties) == 0 {
                best = Some(worker);
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_with(n: u16) -> Pool {
        let pool = Pool::new(Arc::new(Metrics::new()));
        for port in 1..=n {
            let url = WorkerUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap();
            pool.add(url);
        }
        pool
    }

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
        ] {
            assert!(WorkerUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn ties_spread_and_load_is_respected() {
        let pool = pool_with(3);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let guard = pool.pick(None, &[]).unwrap();
            seen.insert(guard.worker().url().to_owned());
        }
        assert_eq!(seen.len(), 3, "idle picks must not always hit one worker");
        let held: Vec<_> = (0..3).map(|_| pool.pick(None, &[]).unwrap()).collect();
        let urls: std::collections::HashSet<_> = held.iter().map(|g| g.worker().url()).collect();
        assert_eq!(
            urls.len(),
            3,
            "three concurrent picks land on three workers"
        );
        drop(held);
        assert!(pool.snapshot().iter().all(|w| w.in_flight() == 0));
    }

    #[test]
    fn dead_workers_and_hints() {
        let pool = pool_with(2);
        let workers = pool.snapshot();
        assert_eq!(workers[0].record_failure(2), None);
        assert_eq!(workers[0].record_failure(2), Some(Transition::Died));
        for _ in 0..20 {
            assert_eq!(
                pool.pick(None, &[]).unwrap().worker().url(),
                workers[1].url()
            );
        }
        let dead_hint = RouteHint::Prefer(workers[0].url().to_owned());
        assert_eq!(
            pool.pick(Some(&dead_hint), &[]).unwrap().worker().url(),
            workers[1].url()
        );
        assert_eq!(workers[0].record_success(1), Some(Transition::Revived));
        assert_eq!(
            pool.pick(Some(&dead_hint), &[]).unwrap().worker().url(),
            workers[0].url()
        );
        assert!(pool.pick(None, &workers).is_none());
    }
}
