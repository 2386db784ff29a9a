//! The state every request handler shares, across all serving threads: the pool, the
//! middleware pipeline, metrics, and the settings the data path reads.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::HeaderName;
use tokio::sync::Semaphore;

use crate::config::Config;
use crate::control::Control;
use crate::health::ProbeNow;
use crate::metrics::Metrics;
use crate::middleware::{Pipeline, PipelineOptions};
use crate::policy::cache_aware::CacheAware;
use crate::policy::least_in_flight::LeastInFlight;
use crate::policy::session::{DEFAULT_HEADERS, Sessions};
use crate::policy::{LoadBound, Policy};
use crate::pool::Pool;
use crate::proxy::{Limits, Proxy};
use crate::tokenizer::Tokenizer;
use crate::worker::{WorkerType, WorkerUrl};
use crate::worker_hosts::WorkerHosts;

/// How long `/engine_metrics` waits for one worker's `/metrics`.
const ENGINE_METRICS_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything a request handler needs, shared by all threads.
pub struct App {
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    pipeline: Pipeline,
    probe_now: ProbeNow,
    admin_key: Option<String>,
    body_limit: usize,
    body_timeout: Duration,
    next_id: AtomicU64,
    /// Upstream connections across all threads (`--slime-router-max-connections`).
    permits: Arc<Semaphore>,
    /// Client connections across all threads (`--max-client-connections`).
    client_slots: Arc<Semaphore>,
    limits: Limits,
    /// For `/engine_metrics`: its own connections and a short timeout, so a stuck engine
    /// cannot hold a scrape.
    engine_client: reqwest::Client,
    control: Control,
    worker_hosts: WorkerHosts,
}

impl App {
    /// Builds the shared state from `config`: registers `--worker-urls`, loads the tokenizer
    /// and every middleware. Fails on any configuration error, naming the culprit.
    pub async fn load(config: &Config, probe_now: ProbeNow) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new());
        let pool = Arc::new(pool(config, metrics.clone())?);
        let worker_hosts =
            WorkerHosts::parse(&config.allow_worker_host).map_err(anyhow::Error::msg)?;
        for raw in &config.worker_urls {
            let url = WorkerUrl::parse(raw).map_err(anyhow::Error::msg)?;
            worker_hosts
                .check(url.host(), &url.addresses().await)
                .map_err(anyhow::Error::msg)?;
            let (worker, _) = pool
                .add(url, WorkerType::Regular)
                .map_err(|w| anyhow::anyhow!("worker {} is listed twice", w.url()))?;
            probe_now.request(worker);
        }
        let tokenizer = match &config.hf_checkpoint {
            Some(path) => Some(Arc::new(Tokenizer::load(path)?)),
            None => None,
        };
        let options = PipelineOptions {
            specs: config.slime_router_middleware_paths.clone(),
            memory_cap: usize::try_from(config.middleware_memory_mib << 20).unwrap_or(usize::MAX),
            deadline: Duration::from_secs_f64(config.middleware_deadline_ms / 1000.0),
        };
        let pipeline = Pipeline::load(&options, pool.clone(), metrics.clone(), tokenizer).await?;
        Ok(Self {
            pool,
            metrics,
            pipeline,
            probe_now,
            admin_key: config.admin_api_key.clone().filter(|k| !k.is_empty()),
            body_limit: config.max_request_body_bytes(),
            body_timeout: Duration::from_secs_f64(config.client_body_timeout_secs),
            next_id: AtomicU64::new(1),
            permits: Arc::new(Semaphore::new(config.slime_router_max_connections as usize)),
            client_slots: Arc::new(Semaphore::new(config.max_client_connections as usize)),
            limits: Limits {
                capacity: config.slime_router_max_connections,
                timeout: config.upstream_timeout(),
                connect_timeout: Duration::from_secs_f64(config.connect_timeout_secs),
                failure_threshold: config.slime_router_health_check_failure_threshold,
            },
            engine_client: reqwest::Client::builder()
                .timeout(ENGINE_METRICS_TIMEOUT)
                .no_proxy()
                .build()?,
            control: Control::new(config.control_timeout())?,
            worker_hosts,
        })
    }

    /// The hosts workers may be registered at (`--allow-worker-host`).
    pub fn worker_hosts(&self) -> &WorkerHosts {
        &self.worker_hosts
    }

    /// The control plane: fanned-out RL control calls and the rids in flight.
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// The workers.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The workers, for tasks that outlive a request (the health loop).
    pub fn shared_pool(&self) -> Arc<Pool> {
        self.pool.clone()
    }

    /// The router's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The middleware pipeline.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Asks the health loop for an early probe.
    pub fn probe_now(&self) -> &ProbeNow {
        &self.probe_now
    }

    /// The admin key, when worker management needs one.
    pub fn admin_key(&self) -> Option<&str> {
        self.admin_key.as_deref()
    }

    /// The request body cap (`--max-request-body-mib`).
    pub fn body_limit(&self) -> usize {
        self.body_limit
    }

    /// Slots for client connections; one is held while a connection is open.
    pub fn client_slots(&self) -> Arc<Semaphore> {
        self.client_slots.clone()
    }

    /// How long a client may take to send its body (`--client-body-timeout-secs`).
    pub fn body_timeout(&self) -> Duration {
        self.body_timeout
    }

    /// The client `/engine_metrics` fetches with.
    pub fn engine_client(&self) -> &reqwest::Client {
        &self.engine_client
    }

    /// A fresh request id, unique for the router's lifetime.
    pub fn next_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A serving thread's way to the workers, sharing the connection limit.
    pub fn proxy(&self) -> Proxy {
        Proxy::new(
            self.permits.clone(),
            self.limits,
            self.control.rids().clone(),
        )
    }
}

/// The pool with `--policy` and session keys from `config`.
fn pool(config: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Pool> {
    let bound = LoadBound {
        abs: config.balance_abs_threshold,
        rel: config.balance_rel_threshold,
    };
    let policy: Box<dyn Policy> = match config.policy.as_str() {
        "cache_aware" => {
            let capacity = usize::try_from(config.cache_capacity_tokens).unwrap_or(usize::MAX);
            Box::new(CacheAware::new(bound, capacity, &metrics))
        }
        _ => Box::new(LeastInFlight),
    };
    let mut headers = Vec::new();
    for name in DEFAULT_HEADERS
        .iter()
        .copied()
        .chain(config.routing_key_headers.iter().map(String::as_str))
    {
        let header = HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
            .map_err(|_| anyhow::anyhow!("--routing-key-headers: {name:?} is not a header name"))?;
        headers.push(header);
    }
    let max = usize::try_from(config.max_sessions).unwrap_or(usize::MAX);
    let sessions = Sessions::new(
        headers,
        bound,
        Duration::from_secs_f64(config.session_idle_secs),
        NonZeroUsize::new(max).unwrap_or(NonZeroUsize::MIN),
        &metrics,
    );
    tracing::debug!(policy = policy.name(), "routing policy");
    Ok(Pool::with_policy(metrics, policy, Some(sessions))
        .with_version_policy(config.version_policy))
}
