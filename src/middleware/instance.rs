//! One loaded middleware: its manifest and its instances. A stateful middleware keeps one
//! long-lived instance with calls serialised; a stateless one draws from a small pool. Every
//! call runs under the CPU deadline and memory cap; an instance whose call failed is thrown
//! away and rebuilt on next use.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use wasmtime::{Store, UpdateDeadline};

use super::bindings::{FailureMode, Handler, Hooks, Manifest, Middleware, MiddlewarePre};
use super::engine::Epochs;
use super::host::{Hook, HookTimers, HostState, Shared};

/// Idle instances kept per stateless middleware.
const POOL_IDLE: usize = 16;

/// An instance and its store.
pub struct Slot {
    store: Store<HostState>,
    bindings: Middleware,
}

impl Slot {
    /// The guest's exports and the store to call them with.
    pub fn parts(&mut self) -> (&Handler, &mut Store<HostState>) {
        (self.bindings.slime_router_handler(), &mut self.store)
    }
}

/// Why a call failed, for logs, metrics and the 500 body.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: FailureKind,
    pub reason: String,
}

/// What went wrong in a middleware call; `label` is the `kind` on /metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The call ran out of its CPU budget.
    Deadline,
    /// The guest hit its memory cap.
    Memory,
    /// The guest trapped.
    Trap,
    /// A fresh instance could not be made.
    Instantiate,
    /// The guest returned a patch the host cannot apply.
    InvalidPatch,
    /// The guest answered with an invalid reply.
    InvalidReply,
    /// The client's body is not what the middleware's edit needs: the client's fault, not
    /// the middleware's (400, never counted as a failure).
    BadRequest,
}

impl FailureKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Deadline => "deadline",
            Self::Memory => "memory",
            Self::Trap => "trap",
            Self::Instantiate => "instantiate",
            Self::InvalidPatch => "invalid-patch",
            Self::InvalidReply => "invalid-reply",
            Self::BadRequest => "bad-request",
        }
    }
}

impl Failure {
    pub fn new(kind: FailureKind, reason: impl Into<String>) -> Self {
        Self {
            kind,
            reason: reason.into(),
        }
    }
}

enum Slots {
    Stateful(tokio::sync::Mutex<Option<Slot>>),
    Pooled(std::sync::Mutex<Vec<Slot>>),
}

/// Everything needed to make a fresh instance of one middleware.
pub struct Factory {
    pub engine: wasmtime::Engine,
    pub epochs: Arc<Epochs>,
    pub pre: MiddlewarePre<HostState>,
    pub config: String,
    pub shared: Arc<Shared>,
    pub memory_cap: usize,
    pub deadline: Duration,
}

impl Factory {
    async fn instantiate(&self) -> wasmtime::Result<(Slot, Manifest)> {
        let state = HostState::new(self.shared.clone(), self.memory_cap, self.deadline);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);
        store.epoch_deadline_callback(|mut ctx| {
            if ctx.data_mut().budget.within() {
                Ok(UpdateDeadline::Continue(1))
            } else {
                Ok(UpdateDeadline::Interrupt)
            }
        });
        store.data_mut().budget.begin(0);
        store.set_epoch_deadline(1);
        let _running = self.epochs.enter();
        let bindings = self.pre.instantiate_async(&mut store).await?;
        let mut slot = Slot { store, bindings };
        let (handler, store) = slot.parts();
        let manifest = handler
            .call_init(&mut *store, &self.config)
            .await?
            .map_err(|e| wasmtime::format_err!("init refused its config: {e}"))?;
        Ok((slot, manifest))
    }
}

pub struct Guest {
    pub manifest: Manifest,
    factory: Factory,
    slots: Slots,
}

impl Guest {
    /// Instantiates once and runs `init`, which validates the config and yields the manifest.
    pub async fn load(factory: Factory) -> anyhow::Result<Self> {
        let (slot, manifest) = factory
            .instantiate()
            .await
            .map_err(|e| anyhow!("{}", describe(&e)))?;
        let slots = if manifest.stateful {
            Slots::Stateful(tokio::sync::Mutex::new(Some(slot)))
        } else {
            Slots::Pooled(std::sync::Mutex::new(vec![slot]))
        };
        Ok(Self {
            manifest,
            factory,
            slots,
        })
    }

    pub fn name(&self) -> &str {
        &self.factory.shared.name
    }

    pub fn timers(&self) -> &HookTimers {
        &self.factory.shared.timers
    }

    /// Runs `f` on an instance under the deadline and memory cap.
    /// `input` is how many bytes the call hands the guest: the CPU budget grows with it (see
    /// [`super::host::CpuBudget::begin`]).
    pub async fn call<R>(
        &self,
        input: usize,
        f: impl AsyncFnOnce(&mut Slot) -> wasmtime::Result<R>,
    ) -> Result<R, Failure> {
        match &self.slots {
            Slots::Stateful(cell) => {
                let mut held = cell.lock().await;
                let mut slot = match held.take() {
                    Some(slot) => slot,
                    None => self.rebuild().await?,
                };
                let result = run(&mut slot, &self.factory.epochs, input, f).await;
                match result {
                    Ok(_) => *held = Some(slot),
                    Err(_) => self.state_lost(),
                }
                result
            }
            Slots::Pooled(idle) => {
                let pooled = lock(idle).pop();
                let mut slot = match pooled {
                    Some(slot) => slot,
                    None => self.rebuild().await?,
                };
                let result = run(&mut slot, &self.factory.epochs, input, f).await;
                if result.is_ok() {
                    let mut idle = lock(idle);
                    if idle.len() < POOL_IDLE {
                        idle.push(slot);
                    }
                }
                result
            }
        }
    }

    /// One hook call: runs `call` on an instance, then `apply` on what it returned (the
    /// host's part: applying a patch, building a reply), times both on the hook's histogram,
    /// and reports a failure to the metrics and the log.
    pub async fn hook<R, T>(
        &self,
        hook: Hook,
        input: usize,
        call: impl AsyncFnOnce(&mut Slot) -> wasmtime::Result<R>,
        apply: impl FnOnce(R) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let started = Instant::now();
        let result = self.call(input, call).await.and_then(apply);
        self.timers()
            .of(hook)
            .observe(started.elapsed().as_secs_f64());
        if let Err(failure) = &result
            && failure.kind != FailureKind::BadRequest
        {
            self.report(hook, failure);
        }
        result
    }

    fn report(&self, hook: Hook, failure: &Failure) {
        let shared = &self.factory.shared;
        shared
            .metrics
            .middleware_failure(&shared.name, failure.kind.label());
        tracing::warn!(
            middleware = self.name(),
            hook = hook.name(),
            kind = failure.kind.label(),
            reason = %failure.reason,
            fail_open = self.fails_open(),
            "middleware failed; instance will be rebuilt"
        );
    }

    /// A stateful instance failed and goes: whatever it held (a trajectory cache) is lost, so
    /// say so where operators look, and let the next instance know (`host.discarded`).
    fn state_lost(&self) {
        let shared = &self.factory.shared;
        let lost = shared
            .discarded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        shared.metrics.state_lost(&shared.name).inc();
        tracing::warn!(
            middleware = self.name(),
            times = lost,
            "stateful middleware lost its state: the next call starts a fresh instance"
        );
    }

    async fn rebuild(&self) -> Result<Slot, Failure> {
        tracing::debug!(middleware = self.name(), "instantiating");
        self.factory
            .instantiate()
            .await
            .map(|(slot, _)| slot)
            .map_err(|e| Failure::new(FailureKind::Instantiate, describe(&e)))
    }
}

async fn run<R>(
    slot: &mut Slot,
    epochs: &Arc<Epochs>,
    input: usize,
    f: impl AsyncFnOnce(&mut Slot) -> wasmtime::Result<R>,
) -> Result<R, Failure> {
    let state = slot.store.data_mut();
    state.budget.begin(input);
    state.limits.memory_hit = false;
    slot.store.set_epoch_deadline(1);
    let _running = epochs.enter();
    match f(slot).await {
        Ok(value) => Ok(value),
        Err(error) => {
            let state = slot.store.data();
            let kind = if state.budget.exceeded {
                FailureKind::Deadline
            } else if state.limits.memory_hit {
                FailureKind::Memory
            } else {
                FailureKind::Trap
            };
            Err(Failure::new(kind, describe(&error)))
        }
    }
}

/// The error and its causes on one line; wasm backtraces stay out of HTTP bodies.
fn describe(error: &wasmtime::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = cause.to_string();
        let first = text.lines().next().unwrap_or_default().trim().to_owned();
        if !first.is_empty()
            && !parts.contains(&first)
            && !first.starts_with("error while executing at wasm backtrace")
        {
            parts.push(first);
        }
    }
    parts.join(": ")
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Guest {
    pub fn fails_open(&self) -> bool {
        matches!(self.manifest.on_failure, FailureMode::FailOpen)
    }

    /// Whether the hooks run for requests to `path` (path without query).
    pub fn applies_to(&self, path: &str) -> bool {
        self.manifest.paths.is_empty() || self.manifest.paths.iter().any(|p| p == path)
    }

    pub fn wants(&self, hooks: Hooks) -> bool {
        self.manifest.hooks.contains(hooks)
    }

    pub fn wants_any(&self, hooks: Hooks) -> bool {
        self.manifest.hooks.intersects(hooks)
    }
}
