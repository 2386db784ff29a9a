//! The wasmtime engine shared by all middleware: compiled once at startup with a pooling
//! allocator, epoch interruption driven by a ticker thread, and one linker holding WASI and
//! the router's imports.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::Thread;
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker, Resource};
use wasmtime::error::Context as _;
use wasmtime::{Config, InstanceAllocationStrategy, PoolingAllocationConfig};

use wasmtime_wasi::p2::DynPollable;

use super::bindings::{Middleware, MiddlewarePre};
use super::host::HostState;

const WASM_PAGE: usize = 64 * 1024;

/// WASI's monotonic clock, as wasmtime-wasi 48 links it (guests importing any 0.2.x get it).
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

const SLEEP_REFUSED: &str = "middleware may not sleep: waiting on the clock \
    (monotonic-clock.subscribe-*) would hold the call, and a stateful middleware's lock, past \
    its CPU deadline";

/// Replaces the clock's `subscribe-duration` and `subscribe-instant` with functions that trap.
///
/// They are the only way a guest can block (its streams never wait and it has no sockets or
/// files), and a suspended call spends no CPU time, so the deadline, which counts CPU time
/// to spare descheduled calls, would never fire. Reading the clock still works.
fn refuse_sleeping(linker: &mut Linker<HostState>) -> anyhow::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    for name in ["subscribe-duration", "subscribe-instant"] {
        clock.func_wrap(
            name,
            |_, (_,): (u64,)| -> wasmtime::Result<(Resource<DynPollable>,)> {
                Err(wasmtime::format_err!(SLEEP_REFUSED))
            },
        )?;
    }
    linker.allow_shadowing(false);
    Ok(())
}

/// Ticks with no guest call running before the ticker sleeps until the next call.
const IDLE_TICKS: u32 = 100;

pub struct Engine {
    engine: wasmtime::Engine,
    linker: Linker<HostState>,
    epochs: Arc<Epochs>,
}

impl Engine {
    /// An engine for `middlewares` components with at most `memory_cap` bytes of linear
    /// memory per instance, whose calls get `deadline` of CPU each.
    pub fn new(middlewares: usize, memory_cap: usize, deadline: Duration) -> anyhow::Result<Self> {
        let mut pooling = PoolingAllocationConfig::new();
        // Calls never suspend, so live instances stay near (pool size x middlewares).
        let instances = 64 * u32::try_from(middlewares.max(1)).unwrap_or(u32::MAX / 64);
        pooling
            .total_component_instances(instances)
            .total_core_instances(instances * 8)
            .total_memories(instances * 2)
            .total_tables(instances * 4)
            .total_stacks(instances)
            // One page above the cap, so the store's limiter (which records why a call
            // failed) refuses growth before the pool does.
            .max_memory_size(memory_cap.saturating_add(WASM_PAGE));
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        let engine = wasmtime::Engine::new(&config).context("cannot create the wasm engine")?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        refuse_sleeping(&mut linker)?;
        Middleware::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        let epochs = Epochs::start(engine.clone(), tick_for(deadline));
        Ok(Self {
            engine,
            linker,
            epochs,
        })
    }

    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.engine
    }

    pub fn epochs(&self) -> &Arc<Epochs> {
        &self.epochs
    }

    /// Compiles and links one component (never on the request path).
    pub fn prepare(&self, bytes: &[u8]) -> anyhow::Result<MiddlewarePre<HostState>> {
        let component =
            Component::new(&self.engine, bytes).context("not a valid WebAssembly component")?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .context("not a slime:router@0.1.0 middleware (imports do not match)")?;
        Ok(MiddlewarePre::new(pre)
            .context("not a slime:router@0.1.0 middleware (exports do not match)")?)
    }
}

/// Budgets are checked once per tick and start at a call's first tick, so a runaway call
/// stops within 2 deadlines. Each tick wakes a thread (tens of µs of CPU on a VM), so it is no shorter than that precision needs.
fn tick_for(deadline: Duration) -> Duration {
    (deadline / 2).clamp(Duration::from_millis(1), Duration::from_millis(50))
}

/// Advances the engine's epoch every tick while guest calls run. After [`IDLE_TICKS`] ticks
/// with none, the ticker thread parks until the next call, so an idle router never wakes.
pub struct Epochs {
    running: AtomicUsize,
    parked: AtomicBool,
    stop: AtomicBool,
    thread: std::sync::OnceLock<Thread>,
}

impl Epochs {
    fn start(engine: wasmtime::Engine, tick: Duration) -> Arc<Self> {
        let epochs = Arc::new(Self {
            running: AtomicUsize::new(0),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            thread: std::sync::OnceLock::new(),
        });
        let ticker = epochs.clone();
        let spawned = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || ticker.run(&engine, tick));
        match spawned {
            Ok(handle) => {
                let _ = epochs.thread.set(handle.thread().clone());
            }
            Err(e) => tracing::error!(
                error = %e,
                "cannot start the epoch ticker: middleware deadlines will not fire"
            ),
        }
        epochs
    }

    fn run(&self, engine: &wasmtime::Engine, tick: Duration) {
        let mut idle = 0;
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(tick);
            engine.increment_epoch();
            if self.running.load(Ordering::SeqCst) > 0 {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle >= IDLE_TICKS {
                // Pairs with `enter`: either it sees `parked` and unparks, or this sees its
                // call running and does not park.
                self.parked.store(true, Ordering::SeqCst);
                if self.running.load(Ordering::SeqCst) == 0 {
                    std::thread::park();
                }
                self.parked.store(false, Ordering::SeqCst);
                idle = 0;
            }
        }
    }

    /// Marks a guest call as running until the guard drops, waking the ticker if it sleeps.
    pub fn enter(&self) -> Running<'_> {
        self.running.fetch_add(1, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst)
            && let Some(thread) = self.thread.get()
        {
            thread.unpark();
        }
        Running(self)
    }
}

pub struct Running<'a>(&'a Epochs);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.epochs.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.epochs.thread.get() {
            thread.unpark();
        }
    }
}
