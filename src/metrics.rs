//! Prometheus metrics, all under the `slime_router_` prefix. Hot-path handles (per-worker
//! counters, the latency histogram) are cloned once and then cost one atomic op per use.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::pool::Pool;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    pub worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MiddlewareLabel {
    pub middleware: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MiddlewareName {
    pub middleware: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookLabel {
    pub middleware: String,
    pub hook: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GuestMetricLabel {
    pub middleware: String,
    pub name: String,
}

/// Counters a worker increments on the hot path.
#[derive(Clone, Debug, Default)]
pub struct WorkerCounters {
    pub requests: Counter,
    pub failures: Counter,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<WorkerLabel, Counter>,
    failures: Family<WorkerLabel, Counter>,
    in_flight: Family<WorkerLabel, Gauge>,
    healthy: Family<WorkerLabel, Gauge>,
    latency: Histogram,
    middleware_failures: Family<MiddlewareLabel, Counter>,
    hook_seconds: Family<HookLabel, Histogram, fn() -> Histogram>,
    tokenizer_seconds: Family<MiddlewareName, Counter<f64, AtomicU64>>,
    guest_counters: Family<GuestMetricLabel, Counter>,
    guest_gauges: Family<GuestMetricLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("slime_router");
        let requests = Family::<WorkerLabel, Counter>::default();
        let failures = Family::<WorkerLabel, Counter>::default();
        let in_flight = Family::<WorkerLabel, Gauge>::default();
        let healthy = Family::<WorkerLabel, Gauge>::default();
        // 100 us .. ~27 min: covers a proxied health check and a long generation alike.
        let latency = Histogram::new(exponential_buckets(0.0001, 2.5, 18));
        let middleware_failures = Family::<MiddlewareLabel, Counter>::default();
        // 1 us .. ~8 s: a no-op call is a few microseconds, a deadline a few milliseconds.
        let tokenizer_seconds = Family::<MiddlewareName, Counter<f64, AtomicU64>>::default();
        let hook_seconds: Family<HookLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(1e-6, 2.0, 24)));
        let guest_counters = Family::<GuestMetricLabel, Counter>::default();
        let guest_gauges = Family::<GuestMetricLabel, Gauge>::default();
        registry.register("requests", "Requests sent to each worker", requests.clone());
        registry.register(
            "request_failures",
            "Connect or transport failures per worker",
            failures.clone(),
        );
        registry.register(
            "worker_in_flight",
            "Requests in flight per worker",
            in_flight.clone(),
        );
        registry.register(
            "worker_healthy",
            "1 when the worker is live, 0 when DEAD",
            healthy.clone(),
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
            "middleware_counter",
            "Counters kept by middleware (host counter-add)",
            guest_counters.clone(),
        );
        registry.register(
            "middleware_gauge",
            "Gauges kept by middleware (host gauge-set)",
            guest_gauges.clone(),
        );
        Self {
            registry,
            requests,
            failures,
            in_flight,
            healthy,
            latency,
            middleware_failures,
            hook_seconds,
            tokenizer_seconds,
            guest_counters,
            guest_gauges,
        }
    }

    pub fn worker_counters(&self, url: &str) -> WorkerCounters {
        let label = WorkerLabel {
            worker: url.to_owned(),
        };
        WorkerCounters {
            requests: self.requests.get_or_create(&label).clone(),
            failures: self.failures.get_or_create(&label).clone(),
        }
    }

    pub fn forget_worker(&self, url: &str) {
        let label = WorkerLabel {
            worker: url.to_owned(),
        };
        for family in [&self.requests, &self.failures] {
            family.remove(&label);
        }
        for family in [&self.in_flight, &self.healthy] {
            family.remove(&label);
        }
    }

    pub fn latency(&self) -> Histogram {
        self.latency.clone()
    }

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

    /// The text exposition, with worker gauges sampled from the pool now.
    pub fn render(&self, pool: &Pool) -> String {
        for worker in pool.snapshot().iter() {
            let label = WorkerLabel {
                worker: worker.url().to_owned(),
            };
            let in_flight = i64::try_from(worker.in_flight()).unwrap_or(i64::MAX);
            self.in_flight.get_or_create(&label).set(in_flight);
            self.healthy
                .get_or_create(&label)
                .set(i64::from(worker.is_live()));
        }
        let mut out = String::new();
        // Writing into a String only fails if an encoder is broken; keep what was written.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
