//! A mock SGLang worker for slime-router's tests, demos and benchmarks: `/generate` (text or
//! input_ids, deterministic output in SGLang's response shape, SSE when `stream: true`),
//! `/health` (switchable), `/get_model_info`, `/abort_request`, `/flush_cache`, and `/echo`,
//! which answers with the request body byte for byte. It binds before it returns its URL, so
//! a test never sleeps waiting for it.
//!
//! With `role: Prefill` or `Decode` it plays one side of a prefill/decode pair (see
//! [`Role`]). `/metrics` answers in SGLang's naming (`sglang:num_running_reqs`, ...).
//!
//! For the RL control loop it serves `/pause_generation` (new generations wait) and
//! `/continue_generation`, `/update_weights_from_disk` and the other weight updates (a
//! `weight_version` in the body becomes the version it reports), and a rid-aware
//! `/abort_request` (`{"rid"}` by prefix, as SGLang matches, or `{"abort_all": true}`): an
//! aborted generation answers with its partial output and `finish_reason.type` `abort`.
//!
//! Per-request knobs (headers): `x-mock-delay-ms` delays the answer, `x-mock-status` forces
//! a status. `POST /mock/health?healthy=false` makes `/health` answer 503 (and `=true` undoes
//! it), for demos of the router's health checks.

mod body;
mod chat;
mod control;
mod generate;
mod kv;
mod routes;
mod state;
mod tokenizer;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub use generate::mock_logprob;
pub use kv::KvModel;
pub use state::{MockConfig, Role, Seen};
pub use tokenizer::Tokenizer;

use state::{State, lock};

/// A running mock worker; dropping it stops it.
pub struct MockWorker {
    addr: SocketAddr,
    config: MockConfig,
    state: Arc<State>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl MockWorker {
    /// Starts on an ephemeral loopback port.
    pub async fn start(config: MockConfig) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
    }

    /// Starts on `addr` (port 0 picks a free one).
    pub async fn start_on(addr: SocketAddr, config: MockConfig) -> std::io::Result<Self> {
        let state = Arc::new(State::default());
        state.healthy.store(true, Ordering::Relaxed);
        *lock(&state.weight_version) = if config.weight_version.is_empty() {
            "default".to_owned()
        } else {
            config.weight_version.clone()
        };
        if let Some(model) = config.kv {
            let _ = state
                .scheduler
                .set(kv::Scheduler::start(model, state.prefill_computed.clone()));
        }
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let server = Some(tokio::spawn(serve(listener, config.clone(), state.clone())));
        Ok(Self {
            addr,
            config,
            state,
            server,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kills the worker: stops listening and drops every open connection mid-request.
    pub fn kill(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }

    /// Serves again on the same port after [`kill`](Self::kill).
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        let listener = TcpListener::bind(self.addr).await?;
        self.server = Some(tokio::spawn(serve(
            listener,
            self.config.clone(),
            self.state.clone(),
        )));
        Ok(())
    }

    /// Makes `/health` answer 200 (true) or 503 (false).
    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::Relaxed);
    }

    /// The next /generate answers with exactly these output ids.
    pub fn script_output(&self, ids: Vec<u32>) {
        *lock(&self.state.scripted) = Some(ids);
    }

    /// Prompt tokens the KV cost model computed (not found in its cache) so far.
    pub fn prefill_computed(&self) -> u64 {
        self.state.prefill_computed.load(Ordering::Relaxed)
    }

    /// Generations that ended aborted (by `/abort_request` or `/pause_generation`).
    pub fn aborted(&self) -> usize {
        self.state.aborted.load(Ordering::Relaxed)
    }

    /// Client connections open now (the router's upstream connections).
    pub fn open_connections(&self) -> usize {
        self.state.connections.load(Ordering::Relaxed)
    }

    /// The weight version it reports now.
    pub fn weight_version(&self) -> String {
        lock(&self.state.weight_version).clone()
    }

    /// Whether it is paused (`/pause_generation` without `/continue_generation` yet).
    pub fn is_paused(&self) -> bool {
        *self.state.paused.borrow()
    }

    /// Health and model-info probes received so far (not in [`MockWorker::requests`]).
    pub fn probes(&self) -> usize {
        self.state.probes.load(Ordering::Relaxed)
    }

    /// Requests received so far, probes left out.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Requests being answered now (a stream counts until its last event).
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::Relaxed)
    }

    /// The most requests ever in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::Relaxed)
    }

    /// Every request received so far (kept only with `MockConfig::record`).
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state.seen).clone()
    }

    /// The last request received (kept only with `MockConfig::record`).
    pub fn last_seen(&self) -> Option<Seen> {
        lock(&self.state.seen).last().cloned()
    }
}

impl Drop for MockWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Loads a tokenizer for the mock (same file the router gets), for tests and demos.
pub fn load_tokenizer(path: &Path) -> anyhow::Result<Arc<Tokenizer>> {
    Ok(Arc::new(Tokenizer::load(path)?))
}

async fn serve(listener: TcpListener, config: MockConfig, state: Arc<State>) {
    // Connection tasks live in this set so aborting the server drops them all (a "kill").
    let mut connections = JoinSet::new();
    let config = Arc::new(config);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let open = OpenConnection::new(&state);
        let (config, state) = (config.clone(), state.clone());
        let service = service_fn(move |req| {
            let (config, state) = (config.clone(), state.clone());
            async move { Ok::<_, Infallible>(routes::respond(&config, &state, req).await) }
        });
        connections.spawn(async move {
            let _open = open;
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

/// Counts a client connection while it is open.
struct OpenConnection(Arc<State>);

impl OpenConnection {
    fn new(state: &Arc<State>) -> Self {
        state.connections.fetch_add(1, Ordering::Relaxed);
        Self(state.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}
