//! Accepting connections and routing each request: admin endpoints, middleware-owned
//! routes, fan-out endpoints, and everything else through the middleware pipeline to a
//! worker.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin;
use crate::body::RouterBody;
use crate::config::Config;
use crate::error::RouterError;
use crate::fanout;
use crate::health::{self, Prober};
use crate::metrics::Metrics;
use crate::middleware::{Exchange, Pipeline};
use crate::pool::{Pool, WorkerUrl};
use crate::proxy::{Answer, Proxy};
use crate::tokenizer::Tokenizer;

/// Everything a request handler needs, shared by all connections.
pub struct App {
    pool: Arc<Pool>,
    proxy: Proxy,
    metrics: Arc<Metrics>,
    pipeline: Pipeline,
    prober: Prober,
    admin_key: Option<String>,
    body_limit: usize,
    next_id: AtomicU64,
}

impl App {
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn prober(&self) -> &Prober {
        &self.prober
    }

    pub fn admin_key(&self) -> Option<&str> {
        self.admin_key.as_deref()
    }
}

/// A router serving on its own tasks; dropping it stops everything without draining.
pub struct RunningRouter {
    addr: SocketAddr,
    app: Arc<App>,
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
    health: JoinHandle<()>,
    drain_timeout: Duration,
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
        let proxy = Proxy::new(
            config.slime_router_max_connections,
            config.upstream_timeout(),
            config.slime_router_health_check_failure_threshold,
        );
        let bind = (config.sglang_router_ip.as_str(), config.sglang_router_port);
        let listener = TcpListener::bind(bind)
            .await
            .with_context(|| format!("cannot listen on {}:{}", bind.0, bind.1))?;
        let addr = listener.local_addr()?;
        let app = Arc::new(App {
            pool: pool.clone(),
            proxy,
            metrics,
            pipeline,
            prober: prober.clone(),
            admin_key: config.admin_api_key.clone().filter(|k| !k.is_empty()),
            body_limit: config.max_request_body_bytes(),
            next_id: AtomicU64::new(1),
        });
        let (stop, stopped) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, app.clone(), stopped));
        let health = health::spawn(prober, pool, config.health_interval());
        Ok(Self {
            addr,
            app,
            stop,
            accept,
            health,
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
    /// drain timeout, then stops the health loop.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(self.drain_timeout, &mut self.accept)
            .await
            .is_err()
        {
            tracing::warn!("drain timeout reached; dropping remaining connections");
        }
        // Drop aborts the accept task (and with it any connection still open) and the
        // health loop.
    }
}

impl Drop for RunningRouter {
    fn drop(&mut self) {
        self.accept.abort();
        self.health.abort();
    }
}

async fn accept_loop(listener: TcpListener, app: Arc<App>, mut stopped: watch::Receiver<bool>) {
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
        let app = app.clone();
        let service = service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(handle(&app, req).await) }
        });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(graceful.watch(connection));
    }
    drop(listener);
    graceful.shutdown().await;
}

async fn handle(app: &App, req: Request<Incoming>) -> Response<RouterBody> {
    let result = match admin::Route::of(req.uri().path()) {
        Some(route) => admin::serve(app, route, req).await,
        None => proxied(app, req).await,
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

async fn proxied(app: &App, req: Request<Incoming>) -> Result<Response<RouterBody>, RouterError> {
    let (parts, body) = req.into_parts();
    let body = read_body_checked(&parts.headers, body, app.body_limit).await?;
    let id = app.next_id.fetch_add(1, Ordering::Relaxed);
    let mut exchange = Exchange::new(id, parts, body);
    if let Some(reply) = app.pipeline.on_request(&mut exchange).await? {
        return Ok(reply);
    }
    if let Some(owner) = app.pipeline.route_owner(&exchange) {
        return app.pipeline.handle(owner, exchange).await;
    }
    if fanout::is_fanout(&exchange.out.path) {
        return fanout::broadcast(app, &mut exchange.out).await;
    }
    let answer = app.proxy.send(&app.pool, &mut exchange.out).await?;
    if app.pipeline.wants_response(&exchange) {
        return app
            .pipeline
            .on_response(exchange, answer, app.proxy.timeout())
            .await;
    }
    Ok(passthrough(answer, app.proxy.timeout()))
}

/// The worker's response as it came, its body streamed with the lease attached.
pub fn passthrough(answer: Answer, idle_timeout: Option<Duration>) -> Response<RouterBody> {
    let (parts, incoming) = answer.response.into_parts();
    Response::from_parts(
        parts,
        RouterBody::upstream(incoming, answer.lease, idle_timeout),
    )
}

async fn read_body_checked(
    headers: &http::HeaderMap,
    body: Incoming,
    limit: usize,
) -> Result<Bytes, RouterError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(RouterError::BodyTooLarge { limit });
    }
    read_body(body, limit).await
}

/// Reads a whole request body, refusing more than `limit` bytes.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, RouterError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(RouterError::BodyTooLarge { limit })
        }
        Err(e) => Err(RouterError::BadRequest(format!(
            "could not read the request body: {e}"
        ))),
    }
}
