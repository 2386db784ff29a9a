//! The router's lifecycle: building the shared state, one serving thread per core with its
//! own listener and event loop, accepting connections (each request goes to
//! [`crate::dispatch`]), the health loop, and a graceful drain at shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::app::App;
use crate::background::AbortOnDrop;
use crate::config::Config;
use crate::dispatch::{self, Local};
use crate::health::{self, ProbeNow, Prober};
use crate::listen;
use crate::parse_errors::JsonErrors;

/// A router serving on threads of its own; dropping it stops everything without draining.
pub struct RunningRouter {
    addr: SocketAddr,
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
        let (probe_now, probe_requests) = ProbeNow::channel();
        let app = Arc::new(App::load(config, probe_now).await?);
        release_startup_memory();
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
        let (stop, stopped) = watch::channel(Stop::Run);
        let mut health = Some(health::run(
            prober,
            app.shared_pool(),
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
            stop,
            done,
            drain_timeout: Duration::from_secs_f64(config.shutdown_timeout),
        })
    }

    /// The address it listens on (port 0 resolved).
    pub fn addr(&self) -> SocketAddr {
        self.addr
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
            let _health = self.health.map(AbortOnDrop::spawn);
            let app = self.app;
            let proxy = app.proxy();
            accept_loop(listener, Arc::new(Local { app, proxy }), self.stopped).await;
        });
    }
}

async fn accept_loop(listener: TcpListener, local: Arc<Local>, mut stopped: watch::Receiver<Stop>) {
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    // half_close: a client that shuts its sending side after the request still reads the
    // answer (without it, hyper treats the early EOF as the connection's end).
    http.timer(TokioTimer::new())
        .keep_alive(true)
        .half_close(true);
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
        let Ok(slot) = local.app.client_slots().try_acquire_owned() else {
            tokio::spawn(refuse(stream));
            continue;
        };
        let local = local.clone();
        // How many requests the service was handed, so that the parser's own error answers
        // (the rest) can be told apart and given JSON bodies.
        let seen = Arc::new(AtomicU64::new(0));
        let counted = seen.clone();
        let service = service_fn(move |req| {
            counted.fetch_add(1, Ordering::Relaxed);
            let local = local.clone();
            async move { Ok::<_, Infallible>(dispatch::handle(&local, req).await) }
        });
        let io = TokioIo::new(JsonErrors::new(stream, seen));
        let connection = graceful.watch(http.serve_connection(io, service));
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
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

/// Answers a connection beyond `--max-client-connections` with 503 and closes it, without
/// reading its request: refusing must cost less than serving.
async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    const BODY: &str = r#"{"error":"too many client connections (--max-client-connections)"}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Compiling the middleware (Cranelift) and loading the tokenizer leave megabytes of freed
/// heap that glibc keeps mapped; handing those pages back makes the idle footprint what
/// serving needs.
fn release_startup_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages at the top of the heaps to the kernel; it
    // touches no memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}
