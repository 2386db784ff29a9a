//! Accepting connections and routing each request: admin endpoints, middleware-owned
//! routes, fan-out endpoints, and everything else through the middleware pipeline to a
//! worker.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::task::JoinHandle;

use crate::admin;
use crate::body::RouterBody;
use crate::config::Config;
use crate::error::RouterError;
use crate::fanout;
use crate::health::{self, ProbeNow, Prober};
use crate::listen;
use crate::metrics::Metrics;
use crate::middleware::{Exchange, Pipeline};
use crate::pool::{Pool, WorkerUrl};
use crate::proxy::{Answer, Proxy};
use crate::tokenizer::Tokenizer;

/// Everything a request handler needs, shared by all threads.
pub struct App {
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    pipeline: Pipeline,
    probe_now: ProbeNow,
    admin_key: Option<String>,
    body_limit: usize,
    next_id: AtomicU64,
    /// Upstream connections across all threads (`--slime-router-max-connections`).
    permits: Arc<Semaphore>,
    upstream_timeout: Option<Duration>,
    failure_threshold: u32,
}

impl App {
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn probe_now(&self) -> &ProbeNow {
        &self.probe_now
    }

    pub fn admin_key(&self) -> Option<&str> {
        self.admin_key.as_deref()
    }
}

/// One serving thread's view: the shared app and this thread's upstream client.
pub struct Local {
    pub app: Arc<App>,
    pub proxy: Proxy,
}

/// A router serving on threads of its own; dropping it stops everything without draining.
pub struct RunningRouter {
    addr: SocketAddr,
    app: Arc<App>,
    stop: watch::Sender<Stop>,
    done: Vec<oneshot::Receiver<()>>,
    drain_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Run,
    Drain,
    Now,
}

impl RunningRouter {
    /// Builds the router from `config` (loading middleware, registering `--worker-urls`) and
    /// starts serving. Fails on any configuration error, naming the culprit.
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new());
        let pool = Arc::new(Pool::new(metrics.clone()));
        for raw in &config.worker_urls {
            let url = WorkerUrl::parse(raw).map_err(anyhow::Error::msg)?;
            pool.add(url);
        }
        let tokenizer = match &config.hf_checkpoint {
            Some(path) => Some(Arc::new(Tokenizer::load(path)?)),
            None => None,
        };
        let pipeline = Pipeline::load(config, pool.clone(), metrics.clone(), tokenizer).await?;
        let prober = Prober::new(
            Duration::from_secs_f64(config.health_check_timeout),
            &config.health_check_path,
            config.slime_router_health_check_failure_threshold,
            config.health_check_success_threshold,
        )?;
        let threads = config.threads.map(usize::from).unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        let listeners = listen::bind(&config.sglang_router_ip, config.sglang_router_port, threads)?;
        let addr = listeners[0].local_addr()?;
        let (probe_now, probe_requests) = ProbeNow::channel();
        let app = Arc::new(App {
            pool: pool.clone(),
            metrics,
            pipeline,
            probe_now,
            admin_key: config.admin_api_key.clone().filter(|k| !k.is_empty()),
            body_limit: config.max_request_body_bytes(),
            next_id: AtomicU64::new(1),
            permits: Arc::new(Semaphore::new(config.slime_router_max_connections as usize)),
            upstream_timeout: config.upstream_timeout(),
            failure_threshold: config.slime_router_health_check_failure_threshold,
        });
        let (stop, stopped) = watch::channel(Stop::Run);
        let mut health = Some(health::run(
            prober,
            pool,
            config.health_interval(),
            probe_requests,
        ));
        let mut done = Vec::new();
        for (index, listener) in listeners.into_iter().enumerate() {
            let (finished, finished_rx) = oneshot::channel();
            let thread = Thread {
                app: app.clone(),
                listener,
                stopped: stopped.clone(),
                health: health.take(),
            };
            std::thread::Builder::new()
                .name(format!("router-{index}"))
                .spawn(move || {
                    thread.serve();
                    let _ = finished.send(());
                })
                .context("cannot start a serving thread")?;
            done.push(finished_rx);
        }
        Ok(Self {
            addr,
            app,
            stop,
            done,
            drain_timeout: Duration::from_secs_f64(config.shutdown_timeout),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Stops accepting, lets in-flight requests (streams included) finish for up to the
    /// drain timeout, then stops everything, the health loop included.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(Stop::Drain);
        let all_done = async {
            for finished in self.done.drain(..) {
                let _ = finished.await;
            }
        };
        if tokio::time::timeout(self.drain_timeout, all_done)
            .await
            .is_err()
        {
            tracing::warn!("drain timeout reached; dropping remaining connections");
        }
    }
}

impl Drop for RunningRouter {
    fn drop(&mut self) {
        let _ = self.stop.send(Stop::Now);
    }
}

/// One serving thread: a current-thread runtime with its own listener (SO_REUSEPORT) and
/// upstream client, so a request never hops threads; the in-flight counts are shared atomics.
struct Thread<H> {
    app: Arc<App>,
    listener: std::net::TcpListener,
    stopped: watch::Receiver<Stop>,
    /// The health loop runs on the first thread.
    health: Option<H>,
}

impl<H: std::future::Future<Output = ()> + Send + 'static> Thread<H> {
    fn serve(self) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!(error = %e, "cannot start a serving runtime");
                return;
            }
        };
        runtime.block_on(async move {
            let listener = match TcpListener::from_std(self.listener) {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::error!(error = %e, "cannot register the listener");
                    return;
                }
            };
            let _health = self.health.map(|health| AbortOnDrop(tokio::spawn(health)));
            let app = self.app;
            let proxy = Proxy::new(
                app.permits.clone(),
                app.upstream_timeout,
                app.failure_threshold,
            );
            accept_loop(listener, Arc::new(Local { app, proxy }), self.stopped).await;
        });
    }
}

/// Aborts its task when dropped, so no background task outlives its owner.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn accept_loop(listener: TcpListener, local: Arc<Local>, mut stopped: watch::Receiver<Stop>) {
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).keep_alive(true);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let local = local.clone();
        let service = service_fn(move |req| {
            let local = local.clone();
            async move { Ok::<_, Infallible>(handle(&local, req).await) }
        });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(graceful.watch(connection));
    }
    drop(listener);
    if *stopped.borrow() == Stop::Now {
        return;
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = stopped.wait_for(|s| *s == Stop::Now) => {}
    }
}

async fn handle(local: &Local, req: Request<Incoming>) -> Response<RouterBody> {
    let result = match admin::Route::of(req.uri().path()) {
        Some(route) => admin::serve(&local.app, route, req).await,
        None => proxied(local, req).await,
    };
    result.unwrap_or_else(|e| {
        if e.status().is_server_error() {
            tracing::warn!(error = %e, "request failed");
        } else {
            tracing::debug!(error = %e, "request rejected");
        }
        e.into_response()
    })
}

async fn proxied(
    local: &Local,
    req: Request<Incoming>,
) -> Result<Response<RouterBody>, RouterError> {
    let (app, proxy) = (&*local.app, &local.proxy);
    let (parts, body) = req.into_parts();
    let body = crate::body::read_request(&parts.headers, body, app.body_limit).await?;
    let id = app.next_id.fetch_add(1, Ordering::Relaxed);
    let mut exchange = Exchange::new(id, parts, body);
    if let Some(reply) = app.pipeline.on_request(&mut exchange).await? {
        return Ok(reply);
    }
    if let Some(owner) = app.pipeline.route_owner(&exchange) {
        return app.pipeline.handle(owner, exchange).await;
    }
    if fanout::is_fanout(&exchange.out.path) {
        return fanout::broadcast(app.pool(), proxy, &mut exchange.out).await;
    }
    let answer = proxy.send(&app.pool, &mut exchange.out).await?;
    if app.pipeline.wants_response(&exchange) {
        return app
            .pipeline
            .on_response(exchange, answer, proxy.timeout())
            .await;
    }
    Ok(passthrough(answer, proxy.timeout()))
}

/// The worker's response as it came, its body streamed with the lease attached.
pub fn passthrough(answer: Answer, idle_timeout: Option<Duration>) -> Response<RouterBody> {
    let (parts, incoming) = answer.response.into_parts();
    Response::from_parts(
        parts,
        RouterBody::upstream(incoming, answer.lease, idle_timeout),
    )
}
