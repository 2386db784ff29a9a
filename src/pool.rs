//! The registered workers and the pick of one for a request: liveness and the request's
//! earlier attempts filter them, a middleware's hint narrows them, and the routing
//! [`Policy`] chooses. The pool also reports each worker's in-flight count and health on
//! /metrics, as a collector sampled at scrape time.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::{Metrics, WorkerLabel};
use crate::policy::least_in_flight::LeastInFlight;
use crate::policy::session::Sessions;
use crate::policy::version::{VersionGate, VersionPolicy};
use crate::policy::{Candidates, Policy, RouteHint, Routing};
use crate::versions::Versions;
use crate::worker::{InFlight, Role, Tried, Worker, WorkerType, WorkerUrl};

type Workers = Arc<RwLock<Arc<[Arc<Worker>]>>>;

/// All registered workers in registration order. Readers take a cheap snapshot; the rare
/// writers (add/remove) swap in a new list.
pub struct Pool {
    workers: Workers,
    versions: Arc<Versions>,
    version_policy: VersionPolicy,
    policy: Box<dyn Policy>,
    sessions: Option<Sessions>,
    metrics: Arc<Metrics>,
}

impl Pool {
    /// An empty pool routing with least in flight, without session keys.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self::with_policy(metrics, Box::new(LeastInFlight), None)
    }

    /// An empty pool routing with `policy`, and `sessions` keeping keys on their workers;
    /// registers its per-worker gauges on `metrics`.
    pub fn with_policy(
        metrics: Arc<Metrics>,
        policy: Box<dyn Policy>,
        sessions: Option<Sessions>,
    ) -> Self {
        let workers: Workers = Arc::new(RwLock::new(Arc::from(Vec::new())));
        metrics.register_collector(Box::new(WorkerGauges(workers.clone())));
        Self {
            workers,
            versions: Arc::default(),
            version_policy: VersionPolicy::Any,
            policy,
            sessions,
            metrics,
        }
    }

    /// Routes only to workers whose weight version `policy` allows.
    pub fn with_version_policy(mut self, policy: VersionPolicy) -> Self {
        self.version_policy = policy;
        self
    }

    /// The weight versions the workers reported, in order.
    pub fn versions(&self) -> &Versions {
        &self.versions
    }

    /// The session pins, when session keys are on.
    pub fn sessions(&self) -> Option<&Sessions> {
        self.sessions.as_ref()
    }

    /// The workers now, in registration order, dead ones included.
    pub fn snapshot(&self) -> Arc<[Arc<Worker>]> {
        read(&self.workers).clone()
    }

    fn write(&self) -> RwLockWriteGuard<'_, Arc<[Arc<Worker>]>> {
        self.workers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The worker registered under this canonical url.
    pub fn find(&self, url: &str) -> Option<Arc<Worker>> {
        self.snapshot().iter().find(|w| w.url() == url).cloned()
    }

    /// The worker with this `/workers` id.
    pub fn find_id(&self, id: &str) -> Option<Arc<Worker>> {
        self.snapshot().iter().find(|w| w.id() == id).cloned()
    }

    /// Registers `url` as `kind`; returns the worker and whether it is new. A known url of the
    /// same kind is a no-op; of another kind (or bootstrap port) it is refused with the
    /// registered worker, since changing a serving worker's role under its in-flight requests
    /// would pair them wrongly.
    pub fn add(
        &self,
        url: WorkerUrl,
        kind: WorkerType,
    ) -> Result<(Arc<Worker>, bool), Arc<Worker>> {
        let mut workers = self.write();
        if let Some(existing) = workers.iter().find(|w| *w.worker_url() == url) {
            if existing.kind() != kind {
                return Err(existing.clone());
            }
            return Ok((existing.clone(), false));
        }
        static NEXT_INDEX: AtomicUsize = AtomicUsize::new(0);
        let counters = self.metrics.worker_counters(url.as_str());
        let index = NEXT_INDEX.fetch_add(1, Ordering::Relaxed);
        let latency = self.metrics.latency();
        let versions = self.versions.clone();
        let worker = Arc::new(Worker::new(index, url, kind, versions, counters, latency));
        let mut next = workers.to_vec();
        next.push(worker.clone());
        *workers = Arc::from(next);
        Ok((worker, true))
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

    /// Whether generation goes to prefill/decode pairs: at least one of each is live.
    pub fn pairs_ready(&self) -> bool {
        let workers = self.snapshot();
        let live = |role| {
            workers
                .iter()
                .any(|w| w.is_live() && w.kind().role() == role)
        };
        live(Role::Prefill) && live(Role::Decode)
    }

    /// Takes an in-flight slot on a live worker of `role` not in `tried`. A middleware's hint
    /// comes first (it narrows the choice when it names a usable worker), then the request's
    /// session key (its pinned worker), then the policy. Requests for a regular worker go to
    /// a decode worker when no regular one is usable, as SGLang's router sends
    /// non-generation calls in a prefill/decode deployment.
    ///
    /// With a `--version-policy`, only workers recent enough count; when live workers exist
    /// but none is, the answer is [`NoPick::Version`] and the caller may wait for one.
    pub fn pick(
        &self,
        routing: &Routing<'_>,
        hint: Option<&RouteHint>,
        tried: &Tried,
        role: Role,
    ) -> Result<InFlight, NoPick> {
        let workers = self.snapshot();
        let mut all = Candidates::new(&workers, tried, role);
        if role == Role::Regular && all.iter().next().is_none() {
            all = Candidates::new(&workers, tried, Role::Decode);
        }
        let mut newest = None;
        let gate = VersionGate::new(
            self.version_policy,
            &self.versions,
            &workers,
            &mut newest,
            all.role(),
        );
        if gate.is_some() {
            let gated = all.gated(gate);
            if gated.iter().next().is_none() {
                return Err(if all.iter().next().is_some() {
                    NoPick::Version
                } else {
                    NoPick::NoWorker
                });
            }
            all = gated;
        }
        let narrowed = hint.and_then(|hint| all.narrowed(hint));
        let policy = &*self.policy;
        let chosen = match (narrowed, &self.sessions) {
            (Some(narrowed), _) => policy.choose(routing, &narrowed),
            (None, Some(sessions)) => match sessions.key(routing) {
                Some(key) => sessions.pick(key, routing, &all, policy),
                None => policy.choose(routing, &all),
            },
            (None, None) => policy.choose(routing, &all),
        }
        .ok_or(NoPick::NoWorker)?;
        Ok(InFlight::take(chosen))
    }
}

/// Why [`Pool::pick`] found no worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPick {
    /// No live worker of the role (not tried yet).
    NoWorker,
    /// Live workers, but none at a weight version `--version-policy` allows.
    Version,
}

fn read(workers: &Workers) -> RwLockReadGuard<'_, Arc<[Arc<Worker>]>> {
    workers
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A worker and the weight version it runs.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    worker: String,
    weight_version: String,
}

/// `worker_in_flight`, `worker_healthy`, `worker_paused` and `worker_weight_version`, read
/// from the workers at each scrape.
struct WorkerGauges(Workers);

impl fmt::Debug for WorkerGauges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WorkerGauges")
    }
}

impl Collector for WorkerGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let workers = read(&self.0).clone();
        let gauge = |value: fn(&Worker) -> i64| {
            let family = Family::<WorkerLabel, Gauge>::default();
            for worker in workers.iter() {
                let label = WorkerLabel {
                    worker: worker.url().to_owned(),
                };
                family.get_or_create(&label).set(value(worker));
            }
            family
        };
        let in_flight = gauge(|w| i64::try_from(w.in_flight()).unwrap_or(i64::MAX));
        let healthy = gauge(|w| i64::from(w.is_live()));
        let paused = gauge(|w| i64::from(w.is_paused()));
        for (name, help, family) in [
            (
                "worker_in_flight",
                "Requests in flight per worker",
                in_flight,
            ),
            (
                "worker_healthy",
                "1 when the worker is live, 0 when DEAD",
                healthy,
            ),
            (
                "worker_paused",
                "1 between a /pause_generation and a /continue_generation sent through the router",
                paused,
            ),
        ] {
            let metric = encoder.encode_descriptor(name, help, None, family.metric_type())?;
            family.encode(metric)?;
        }
        let versions = Family::<VersionLabel, Gauge>::default();
        for worker in workers.iter() {
            if let Some(version) = worker.weight_version() {
                let label = VersionLabel {
                    worker: worker.url().to_owned(),
                    weight_version: version.to_string(),
                };
                versions.get_or_create(&label).set(1);
            }
        }
        let help = "1 labelled with the weight version each worker reported last";
        let metric = encoder.encode_descriptor(
            "worker_weight_version",
            help,
            None,
            versions.metric_type(),
        )?;
        versions.encode(metric)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::Transition;

    fn pool_with(n: u16) -> Pool {
        let pool = Pool::new(Arc::new(Metrics::new()));
        for port in 1..=n {
            let url = WorkerUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap();
            pool.add(url, WorkerType::Regular).unwrap();
        }
        pool
    }

    fn pick(pool: &Pool, hint: Option<&RouteHint>, tried: &[Arc<Worker>]) -> Option<InFlight> {
        let mut set = Tried::default();
        for worker in tried {
            set.insert(worker);
        }
        pool.pick(&Routing::none(), hint, &set, Role::Regular).ok()
    }

    #[test]
    fn ties_spread_and_load_is_respected() {
        let pool = pool_with(3);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let guard = pick(&pool, None, &[]).unwrap();
            seen.insert(guard.worker().url().to_owned());
        }
        assert_eq!(seen.len(), 3, "idle picks must not always hit one worker");
        let held: Vec<_> = (0..3).map(|_| pick(&pool, None, &[]).unwrap()).collect();
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
                pick(&pool, None, &[]).unwrap().worker().url(),
                workers[1].url()
            );
        }
        let dead_hint = RouteHint::Prefer(workers[0].url().to_owned());
        assert_eq!(
            pick(&pool, Some(&dead_hint), &[]).unwrap().worker().url(),
            workers[1].url()
        );
        assert_eq!(workers[0].record_success(1), Some(Transition::Revived));
        assert_eq!(
            pick(&pool, Some(&dead_hint), &[]).unwrap().worker().url(),
            workers[0].url()
        );
        assert!(pick(&pool, None, &workers).is_none());
    }

    #[test]
    fn roles_and_conflicts() {
        let pool = Pool::new(Arc::new(Metrics::new()));
        let url = |port| WorkerUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let prefill = WorkerType::Prefill {
            bootstrap_port: Some(8998),
        };
        pool.add(url(1), prefill).unwrap();
        assert!(!pool.pairs_ready());
        pool.add(url(2), WorkerType::Decode).unwrap();
        assert!(pool.pairs_ready());
        assert!(pool.add(url(2), WorkerType::Regular).is_err());
        assert!(!pool.add(url(2), WorkerType::Decode).unwrap().1);
        // No regular worker: non-generation calls go to the decode worker, never to prefill.
        for _ in 0..10 {
            let slot = pick(&pool, None, &[]).unwrap();
            assert_eq!(slot.worker().kind(), WorkerType::Decode);
        }
        pool.add(url(3), WorkerType::Regular).unwrap();
        assert_eq!(
            pick(&pool, None, &[]).unwrap().worker().kind(),
            WorkerType::Regular
        );
        let picked = pool
            .pick(&Routing::none(), None, &Tried::default(), Role::Prefill)
            .unwrap();
        assert_eq!(picked.worker().kind(), prefill);
    }
}
