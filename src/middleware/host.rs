//! What a guest's store holds and the host functions it may call: logging, a clock,
//! metrics, a read-only view of the workers and the tokenizer. WASI is linked because Rust
//! std imports it, but grants nothing: no files, sockets, env or args; stdio goes to the log.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{host, tokenizer, types, workers};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::tokenizer::Tokenizer;

/// What every instance of one middleware shares with the router.
pub struct Shared {
    pub name: String,
    pub metrics: Arc<Metrics>,
    pub pool: Arc<Pool>,
    pub tokenizer: Option<Arc<Tokenizer>>,
    pub timers: HookTimers,
    /// Instances of a stateful middleware discarded after a failure (`host.discarded`).
    pub discarded: AtomicU64,
}

/// The guest calls the router makes per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Request,
    Response,
    Chunk,
    Handle,
}

impl Hook {
    /// The WIT name, used in logs and as the `hook` label.
    pub fn name(self) -> &'static str {
        match self {
            Self::Request => "on-request",
            Self::Response => "on-response",
            Self::Chunk => "on-response-chunk",
            Self::Handle => "handle",
        }
    }
}

/// Per-hook latency histograms, looked up once so timing a call costs no label lookup.
pub struct HookTimers {
    request: Histogram,
    response: Histogram,
    chunk: Histogram,
    handle: Histogram,
    pub tokenizer: Counter<f64, AtomicU64>,
}

impl HookTimers {
    pub fn new(metrics: &Metrics, middleware: &str) -> Self {
        let timer = |hook: Hook| metrics.hook_timer(middleware, hook.name());
        Self {
            request: timer(Hook::Request),
            response: timer(Hook::Response),
            chunk: timer(Hook::Chunk),
            handle: timer(Hook::Handle),
            tokenizer: metrics.tokenizer_timer(middleware),
        }
    }

    pub fn of(&self, hook: Hook) -> &Histogram {
        match hook {
            Hook::Request => &self.request,
            Hook::Response => &self.response,
            Hook::Chunk => &self.chunk,
            Hook::Handle => &self.handle,
        }
    }
}

/// The data of one instance's store.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub shared: Arc<Shared>,
    pub limits: Limits,
    pub budget: CpuBudget,
    /// Metric handles by name, so a hot `counter-add` costs no label lookup.
    counters: HashMap<String, Counter>,
    gauges: HashMap<String, Gauge>,
}

impl HostState {
    pub fn new(shared: Arc<Shared>, memory_cap: usize, deadline: Duration) -> Self {
        let log = |stream| LogStream {
            middleware: shared.name.clone().into(),
            stream,
        };
        let wasi = WasiCtx::builder()
            .stdout(log("stdout"))
            .stderr(log("stderr"))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limits: Limits {
                memory_cap,
                memory_hit: false,
            },
            budget: CpuBudget::new(deadline),
            counters: HashMap::new(),
            gauges: HashMap::new(),
            shared,
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The memory cap; remembers a refusal so a failed call can be blamed on it.
pub struct Limits {
    memory_cap: usize,
    pub memory_hit: bool,
}

impl wasmtime::ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            self.memory_hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

/// Guest CPU time of the current call. Thread CPU time rather than wall time, so a loaded
/// machine does not fail calls that are merely descheduled; host calls (tokenising a long
/// prompt) are subtracted, since the guest does not control them. Reading the thread's CPU
/// clock is a system call, so a call that ends before the first epoch tick (nearly all of
/// them) never reads it.
pub struct CpuBudget {
    base: Duration,
    limit: Duration,
    cpu_start: Option<Duration>,
    host: Duration,
    pub exceeded: bool,
}

impl CpuBudget {
    fn new(base: Duration) -> Self {
        Self {
            base,
            limit: base,
            cpu_start: None,
            host: Duration::ZERO,
            exceeded: false,
        }
    }

    /// Starts a call that hands the guest `input` bytes. The budget is the deadline plus
    /// 10 us per KiB of input: a guest must be able to read what it is given (a 32k-token
    /// answer is about a megabyte), while a runaway loop is still stopped within the base.
    pub fn begin(&mut self, input: usize) {
        self.limit = self.base
            + PER_INPUT_KIB.saturating_mul(u32::try_from(input / 1024).unwrap_or(u32::MAX));
        self.cpu_start = None;
        self.host = Duration::ZERO;
        self.exceeded = false;
    }

    /// Called on every epoch tick while the guest runs: false once the budget is spent.
    ///
    /// The first tick only starts the CPU clock: the call's time before it is wall time,
    /// which on a loaded machine is mostly time spent descheduled, and counting it convicted
    /// innocent calls (a stateful guest then lost its state). So a call's budget runs from its
    /// first tick, and a runaway call stops within the deadline plus two ticks.
    pub fn within(&mut self) -> bool {
        let now = thread_cpu_time();
        let Some(start) = self.cpu_start else {
            self.cpu_start = Some(now);
            self.host = Duration::ZERO;
            return true;
        };
        let used = now.saturating_sub(start).saturating_sub(self.host);
        self.exceeded = used > self.limit;
        !self.exceeded
    }

    /// Runs a host call outside the guest's budget; returns its result and duration.
    fn host_call<R>(&mut self, f: impl FnOnce() -> R) -> (R, Duration) {
        let before = Instant::now();
        let result = f();
        let took = before.elapsed();
        self.host += took;
        (result, took)
    }
}

const PER_INPUT_KIB: Duration = Duration::from_micros(10);

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl types::Host for HostState {}

impl host::Host for HostState {
    fn discarded(&mut self) -> u64 {
        self.shared.discarded.load(Ordering::Relaxed)
    }

    fn log(&mut self, level: host::Level, message: String) {
        let middleware = self.shared.name.as_str();
        match level {
            host::Level::Trace => tracing::trace!(middleware, "{message}"),
            host::Level::Debug => tracing::debug!(middleware, "{message}"),
            host::Level::Info => tracing::info!(middleware, "{message}"),
            host::Level::Warn => tracing::warn!(middleware, "{message}"),
            host::Level::Error => tracing::error!(middleware, "{message}"),
        }
    }

    fn now_ns(&mut self) -> u64 {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        let origin = *ORIGIN.get_or_init(Instant::now);
        u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn counter_add(&mut self, name: String, value: u64) {
        if let Some(counter) = self.counters.get(&name) {
            counter.inc_by(value);
        } else if valid_metric_name(&self.shared.name, &name) {
            let counter = self.shared.metrics.guest_counter(&self.shared.name, &name);
            counter.inc_by(value);
            self.counters.insert(name, counter);
        }
    }

    fn gauge_set(&mut self, name: String, value: i64) {
        if let Some(gauge) = self.gauges.get(&name) {
            gauge.set(value);
        } else if valid_metric_name(&self.shared.name, &name) {
            let gauge = self.shared.metrics.guest_gauge(&self.shared.name, &name);
            gauge.set(value);
            self.gauges.insert(name, gauge);
        }
    }
}

fn valid_metric_name(middleware: &str, name: &str) -> bool {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'));
    if !ok {
        tracing::warn!(
            middleware,
            name,
            "ignoring metric with an invalid name (want 1-64 of [a-z0-9_])"
        );
    }
    ok
}

impl workers::Host for HostState {
    fn list(&mut self) -> Vec<workers::Worker> {
        self.shared
            .pool
            .snapshot()
            .iter()
            .map(|w| workers::Worker {
                url: w.url().to_owned(),
                live: w.is_live(),
                in_flight: u32::try_from(w.in_flight()).unwrap_or(u32::MAX),
            })
            .collect()
    }
}

const NO_TOKENIZER: &str =
    "no tokenizer configured: start the router with --hf-checkpoint <model dir>";

const NO_CHAT_TEMPLATE: &str = "the --hf-checkpoint has no chat template: it must be a model \
     directory with chat_template.jinja, or tokenizer_config.json with a `chat_template`";

impl HostState {
    fn with_tokenizer<R>(
        &mut self,
        f: impl FnOnce(&Tokenizer) -> Result<R, String>,
    ) -> Result<R, String> {
        let tokenizer = self
            .shared
            .tokenizer
            .clone()
            .ok_or_else(|| NO_TOKENIZER.to_owned())?;
        let (result, took) = self.budget.host_call(|| f(&tokenizer));
        self.shared.timers.tokenizer.inc_by(took.as_secs_f64());
        result
    }
}

impl tokenizer::Host for HostState {
    fn encode(&mut self, text: String) -> Result<Vec<u32>, String> {
        self.with_tokenizer(|t| t.encode(&text))
    }

    fn decode(&mut self, ids: Vec<u32>, skip_special: bool) -> Result<String, String> {
        self.with_tokenizer(|t| t.decode(&ids, skip_special))
    }

    fn token_lengths(&mut self, ids: Vec<u32>, skip_special: bool) -> Result<Vec<u32>, String> {
        self.with_tokenizer(|t| t.token_lengths(&ids, skip_special))
    }

    fn chat_template(&mut self) -> Result<tokenizer::Template, String> {
        self.with_tokenizer(|t| match t.chat_template() {
            Some(template) => Ok(tokenizer::Template {
                source: template.source.clone(),
                bos_token: template.bos_token.clone(),
                eos_token: template.eos_token.clone(),
            }),
            None => Err(NO_CHAT_TEMPLATE.to_owned()),
        })
    }
}

/// A guest's stdout or stderr, written line by line into the router's log.
struct LogStream {
    middleware: Arc<str>,
    stream: &'static str,
}

impl LogStream {
    fn emit(&self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            tracing::info!(
                middleware = &*self.middleware,
                stream = self.stream,
                "{line}"
            );
        }
    }
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LogStream {
            middleware: self.middleware.clone(),
            stream: self.stream,
        })
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LogStream {
            middleware: self.middleware.clone(),
            stream: self.stream,
        })
    }
}

// Writes complete at once, so a guest that prints never suspends (and never moves thread,
// which would skew its CPU budget).
impl OutputStream for LogStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.emit(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.emit(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_descheduled_before_the_first_tick_is_not_cpu_time() {
        let mut budget = CpuBudget::new(Duration::from_millis(5));
        budget.begin(0);
        // Asleep, as a descheduled call would be: wall time passes, CPU time does not.
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            budget.within(),
            "the first tick convicted a call that used no CPU"
        );
        std::thread::sleep(Duration::from_millis(30));
        assert!(budget.within());
        // Spinning is CPU time: it is stopped.
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(20) {
            std::hint::black_box(0u64);
        }
        assert!(!budget.within(), "20 ms of CPU against a 5 ms budget");
        assert!(budget.exceeded);
    }
}
