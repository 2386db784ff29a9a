//! The wasmtime engine shared by all middleware: compiled once at startup with a pooling
//! allocator, epoch interruption driven by a ticker thread, and one linker holding WASI and
//! the router's imports.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::error::Context as _;
use wasmtime::{Config, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::{Middleware, MiddlewarePre};
use super::host::HostState;

/// How often the epoch advances; a call's CPU budget is checked at this granularity.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);
const WASM_PAGE: usize = 64 * 1024;

pub struct Engine {
    engine: wasmtime::Engine,
    linker: Linker<HostState>,
    _ticker: Ticker,
}

impl Engine {
    /// An engine for `middlewares` components with at most `memory_cap` bytes of linear
    /// memory per instance.
    pub fn new(middlewares: usize, memory_cap: usize) -> anyhow::Result<Self> {
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
        Middleware::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        let ticker = Ticker::start(engine.clone());
        Ok(Self {
            engine,
            linker,
            _ticker: ticker,
        })
    }

    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.engine
    }

    /// Compiles and links one component (never on the request path).
    pub fn prepare(&self, path: &Path) -> anyhow::Result<MiddlewarePre<HostState>> {
        let bytes =
            std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read the file: {e}"))?;
        let component =
            Component::new(&self.engine, &bytes).context("not a valid WebAssembly component")?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .context("not a slime:router@0.1.0 middleware (imports do not match)")?;
        Ok(MiddlewarePre::new(pre)
            .context("not a slime:router@0.1.0 middleware (exports do not match)")?)
    }
}

/// Advances the engine's epoch every tick until dropped.
struct Ticker {
    stop: Arc<AtomicBool>,
}

impl Ticker {
    fn start(engine: wasmtime::Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the epoch ticker: middleware deadlines will not fire");
        }
        Self { stop }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
