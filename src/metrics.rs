//! Prometheus metrics, all under the `slime_router_` prefix. Hot-path handles (per-worker
//! counters, the latency histogram) are cloned once and then cost one atomic op per use.
//! Values owned elsewhere (the pool's per-worker gauges) come in as collectors sampled at
//! scrape time, so this module knows nothing of the types behind them.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::collector::Collector;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `{worker="http://host:port"}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    /// The worker's canonical url.
    pub worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MiddlewareLabel {
    middleware: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MiddlewareName {
    middleware: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabel {
    middleware: String,
    hook: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GuestMetricLabel {
    middleware: String,
    name: String,
}

/// Counters a worker increments on the hot path.
#[derive(Clone, Debug, Default)]
pub struct WorkerCounters {
    /// Requests sent to it.
    pub requests: Counter,
    /// Connect and transport failures.
    pub failures: Counter,
}

/// Counters of how session keys were routed.
#[derive(Clone, Debug)]
pub struct SessionCounters {
    /// Requests that went to their key's pinned worker.
    pub hits: Counter,
    /// Keys placed for the first time (or again after `/finish_session`).
    pub new: Counter,
    moves: Family<CauseLabel, Counter>,
}

impl SessionCounters {
    /// Keys that left their worker for `cause` (overload, dead, removed, expired).
    pub fn moves(&self, cause: &str) -> Counter {
        self.moves
            .get_or_create(&CauseLabel {
                cause: cause.to_owned(),
            })
            .clone()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: String,
}

/// Every metric the router exports.
pub struct Metrics {
    /// Locked only to register a collector (startup) and to render a scrape.
    registry: Mutex<Registry>,
    requests: Family<WorkerLabel, Counter>,
    failures: Family<WorkerLabel, Counter>,
    latency: Histogram,
    middleware_failures: Family<MiddlewareLabel, Counter>,
    hook_seconds: Family<HookLabel, Histogram, fn() -> Histogram>,
    tokenizer_seconds: Family<MiddlewareName, Counter<f64, AtomicU64>>,
    state_lost: Family<MiddlewareName, Counter>,
    guest_counters: Family<GuestMetricLabel, Counter>,
    guest_gauges: Family<GuestMetricLabel, Gauge>,
    engine_metrics_failures: Family<WorkerLabel, Counter>,
    sessions: SessionCounters,
    prefix_match_tokens: Histogram,
    prefix_index_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every family registered, all empty.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("slime_router");
        let requests = Family::<WorkerLabel, Counter>::default();
        let failures = Family::<WorkerLabel, Counter>::default();
        // 100 us .. ~27 min: covers a proxied health check and a long generation alike.
        let latency = Histogram::new(exponential_buckets(0.0001, 2.5, 18));
        let middleware_failures = Family::<MiddlewareLabel, Counter>::default();
        // 1 us .. ~8 s: a no-op call is a few microseconds, a deadline a few milliseconds.
        let tokenizer_seconds = Family::<MiddlewareName, Counter<f64, AtomicU64>>::default();
        let hook_seconds: Family<HookLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(1e-6, 2.0, 24)));
        let state_lost = Family::<MiddlewareName, Counter>::default();
        let guest_counters = Family::<GuestMetricLabel, Counter>::default();
        let guest_gauges = Family::<GuestMetricLabel, Gauge>::default();
        let engine_metrics_failures = Family::<WorkerLabel, Counter>::default();
        let sessions = SessionCounters {
            hits: Counter::default(),
            new: Counter::default(),
            moves: Family::default(),
        };
        registry.register(
            "session_hits",
            "Requests that went to their session key's pinned worker",
            sessions.hits.clone(),
        );
        registry.register(
            "session_new",
            "Session keys placed by the routing policy for the first time",
            sessions.new.clone(),
        );
        registry.register(
            "session_moves",
            "Session keys moved off their worker, by cause",
            sessions.moves.clone(),
        );
        // 16 tokens (one block) .. ~1M tokens.
        let prefix_match_tokens = Histogram::new(exponential_buckets(16.0, 2.0, 17));
        registry.register(
            "prefix_match_tokens",
            "Prompt tokens of a request found on its best worker by --policy cache_aware",
            prefix_match_tokens.clone(),
        );
        let prefix_index_bytes = Gauge::default();
        registry.register(
            "prefix_index_bytes",
            "Approximate memory of the cache_aware prefix index",
            prefix_index_bytes.clone(),
        );
        registry.register("requests", "Requests sent to each worker", requests.clone());
        registry.register(
            "request_failures",
            "Connect or transport failures per worker",
            failures.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Proxied request time, from arrival to the end of the response body",
            latency.clone(),
        );
        registry.register(
            "middleware_failures",
            "Middleware calls that trapped, timed out or hit the memory cap",
            middleware_failures.clone(),
        );
        registry.register(
            "middleware_hook_duration_seconds",
            "Time per middleware hook: the guest call plus applying its patch",
            hook_seconds.clone(),
        );
        registry.register(
            "tokenizer_seconds",
            "Time spent in tokenizer calls made by each middleware (part of its hook time)",
            tokenizer_seconds.clone(),
        );
        registry.register(
            "middleware_state_lost",
            "Stateful middleware instances discarded after a failure, their state (a radix cache) with them",
            state_lost.clone(),
        );
        registry.register(
            "middleware_counter",
            "Counters kept by middleware (host counter-add)",
            guest_counters.clone(),
        );
        registry.register(
            "middleware_gauge",
            "Gauges kept by middleware (host gauge-set)",
            guest_gauges.clone(),
        );
        registry.register(
            "engine_metrics_failures",
            "Workers skipped by /engine_metrics because their /metrics failed",
            engine_metrics_failures.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            requests,
            failures,
            latency,
            middleware_failures,
            hook_seconds,
            tokenizer_seconds,
            state_lost,
            guest_counters,
            guest_gauges,
            engine_metrics_failures,
            sessions,
            prefix_match_tokens,
            prefix_index_bytes,
        }
    }

    /// The session routing counters.
    pub fn session_counters(&self) -> SessionCounters {
        self.sessions.clone()
    }

    /// The histogram of prefix lengths matched by cache_aware, in tokens.
    pub fn prefix_match_tokens(&self) -> Histogram {
        self.prefix_match_tokens.clone()
    }

    /// The gauge of the prefix index's memory.
    pub fn prefix_index_bytes(&self) -> Gauge {
        self.prefix_index_bytes.clone()
    }

    /// Adds metrics sampled at each scrape from state owned elsewhere.
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.registry().register_collector(collector);
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The request and failure counters of the worker at `url`.
    pub fn worker_counters(&self, url: &str) -> WorkerCounters {
        let label = WorkerLabel {
            worker: url.to_owned(),
        };
        WorkerCounters {
            requests: self.requests.get_or_create(&label).clone(),
            failures: self.failures.get_or_create(&label).clone(),
        }
    }

    /// Drops the series of a worker that was removed.
    pub fn forget_worker(&self, url: &str) {
        let label = WorkerLabel {
            worker: url.to_owned(),
        };
        for family in [&self.requests, &self.failures] {
            family.remove(&label);
        }
    }

    /// The request-duration histogram (one for all workers).
    pub fn latency(&self) -> Histogram {
        self.latency.clone()
    }

    /// Counts one failed middleware call of this kind.
    pub fn middleware_failure(&self, middleware: &str, kind: &str) {
        let label = MiddlewareLabel {
            middleware: middleware.to_owned(),
            kind: kind.to_owned(),
        };
        self.middleware_failures.get_or_create(&label).inc();
    }

    /// The histogram timing one hook of one middleware (fetched once, at load).
    pub fn hook_timer(&self, middleware: &str, hook: &str) -> Histogram {
        let label = HookLabel {
            middleware: middleware.to_owned(),
            hook: hook.to_owned(),
        };
        self.hook_seconds.get_or_create(&label).clone()
    }

    /// Seconds a middleware spent in tokenizer calls (fetched once, at load).
    pub fn tokenizer_timer(&self, middleware: &str) -> Counter<f64, AtomicU64> {
        let label = MiddlewareName {
            middleware: middleware.to_owned(),
        };
        self.tokenizer_seconds.get_or_create(&label).clone()
    }

    /// The counter of times a stateful middleware lost its state (fetched once, at load).
    pub fn state_lost(&self, middleware: &str) -> Counter {
        let label = MiddlewareName {
            middleware: middleware.to_owned(),
        };
        self.state_lost.get_or_create(&label).clone()
    }

    /// A middleware's own counter (host `counter-add`), fetched once per instance and name.
    pub fn guest_counter(&self, middleware: &str, name: &str) -> Counter {
        let label = GuestMetricLabel {
            middleware: middleware.to_owned(),
            name: name.to_owned(),
        };
        self.guest_counters.get_or_create(&label).clone()
    }

    /// A middleware's own gauge (host `gauge-set`), fetched once per instance and name.
    pub fn guest_gauge(&self, middleware: &str, name: &str) -> Gauge {
        let label = GuestMetricLabel {
            middleware: middleware.to_owned(),
            name: name.to_owned(),
        };
        self.guest_gauges.get_or_create(&label).clone()
    }

    /// Counts a worker whose `/metrics` failed for `/engine_metrics`.
    pub fn engine_metrics_failure(&self, url: &str) {
        let label = WorkerLabel {
            worker: url.to_owned(),
        };
        self.engine_metrics_failures.get_or_create(&label).inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String only fails if an encoder is broken; keep what was written.
        let _ = encode(&mut out, &self.registry());
        out
    }
}
