//! Connections to workers, kept per serving thread. A connection goes back to the idle list
//! only once its response has been read to the end, so a checked-out connection is always
//! ready; a body abandoned half-way takes its connection with it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::worker::Worker;
use crate::worker_stream::WorkerStream;

/// Idle connections older than this are not reused: servers close idle keep-alive
/// connections (uvicorn, which serves SGLang, after 5 s), and a request sent on one being
/// closed is lost.
const MAX_IDLE: Duration = Duration::from_secs(4);

/// Idle connections kept per worker on one serving thread; a burst's extra ones close as
/// they come back.
const MAX_IDLE_PER_WORKER: usize = 32;

/// How often idle connections past [`MAX_IDLE`] are closed when no traffic comes to do it.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

pub type Sender = SendRequest<Full<Bytes>>;

/// An idle connection: since when, its sender, and its [`WorkerStream`] flag.
type Idle = (Instant, Sender, Arc<AtomicBool>);

/// One serving thread's idle connections, by worker id.
pub struct Connections {
    idle: Mutex<Vec<Vec<Idle>>>,
    /// `--connect-timeout-secs`: a host that drops SYNs (powered off) fails this fast, apart
    /// from the response timeout, so its requests move to a live worker.
    connect_timeout: Duration,
    /// The sweeper starts with the first connection returned, inside the serving runtime.
    sweeping: AtomicBool,
}

/// Why no connection to a worker could be made.
#[derive(Debug)]
pub struct ConnectError {
    /// What went wrong, for the client and the log.
    pub reason: String,
    /// The router's own shortage (out of file descriptors or buffers), not the worker's fault.
    pub local: bool,
}

impl ConnectError {
    fn io(stage: &str, error: &std::io::Error) -> Self {
        // EMFILE, ENFILE, ENOBUFS, ENOMEM: this process or host is out of something.
        let local = matches!(
            error.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        );
        Self {
            reason: format!("{stage}: {error}"),
            local,
        }
    }
}

/// A connection in use.
pub struct Conn {
    pub sender: Sender,
    /// Whether it served a request before (a failure on it may just be a stale connection).
    pub reused: bool,
    /// Set when the worker stopped reading it (see [`WorkerStream`]): never reused then.
    closed_for_writes: Arc<AtomicBool>,
    worker: usize,
    home: Arc<Connections>,
}

impl Conn {
    /// Returns the connection for reuse; call only after its response was read to the end.
    pub fn release(self) {
        if self.sender.is_closed() || self.closed_for_writes.load(Ordering::Relaxed) {
            return;
        }
        self.home.start_sweeping();
        let mut idle = self.home.lock();
        if idle.len() <= self.worker {
            idle.resize_with(self.worker + 1, Vec::new);
        }
        let list = &mut idle[self.worker];
        if list.len() >= MAX_IDLE_PER_WORKER {
            // The oldest is the likeliest to be closed by the worker soon.
            list.remove(0);
        }
        list.push((Instant::now(), self.sender, self.closed_for_writes));
    }
}

impl Connections {
    /// No connections yet; new ones give up after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            idle: Mutex::default(),
            connect_timeout,
            sweeping: AtomicBool::new(false),
        }
    }

    /// Starts closing expired idle connections every [`SWEEP_EVERY`], until `self` is dropped:
    /// after a burst nothing else would, and each one holds a file descriptor here and a
    /// connection on the worker.
    fn start_sweeping(self: &Arc<Self>) {
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let home = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                let Some(home) = home.upgrade() else {
                    return;
                };
                for list in home.lock().iter_mut() {
                    list.retain(|(since, s, _)| since.elapsed() < MAX_IDLE && !s.is_closed());
                }
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<Idle>>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An idle connection to `worker`, or a new one.
    pub async fn get(self: &Arc<Self>, worker: &Worker) -> Result<Conn, ConnectError> {
        while let Some((mut sender, flag)) = self.pop(worker.index()) {
            if sender.ready().await.is_ok() {
                return Ok(self.conn(sender, flag, worker, true));
            }
        }
        self.connect(worker).await
    }

    fn pop(&self, worker: usize) -> Option<(Sender, Arc<AtomicBool>)> {
        let mut idle = self.lock();
        let list = idle.get_mut(worker)?;
        while let Some((since, sender, flag)) = list.pop() {
            if since.elapsed() < MAX_IDLE && !sender.is_closed() {
                return Some((sender, flag));
            }
        }
        None
    }

    /// A new connection to `worker`, driven by a task of its own on this thread.
    pub async fn connect(self: &Arc<Self>, worker: &Worker) -> Result<Conn, ConnectError> {
        let address = worker.authority().as_str();
        let limit = self.connect_timeout;
        let stream = tokio::time::timeout(limit, TcpStream::connect(address))
            .await
            .map_err(|_| ConnectError {
                reason: format!("connect timed out after {}s", limit.as_secs_f64()),
                local: false,
            })?
            .map_err(|e| ConnectError::io("connect", &e))?;
        let _ = stream.set_nodelay(true);
        let (stream, flag) = WorkerStream::new(stream);
        let (sender, connection) =
            http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| ConnectError {
                    reason: format!("handshake: {e}"),
                    local: false,
                })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(self.conn(sender, flag, worker, false))
    }

    fn conn(
        self: &Arc<Self>,
        sender: Sender,
        closed_for_writes: Arc<AtomicBool>,
        worker: &Worker,
        reused: bool,
    ) -> Conn {
        Conn {
            sender,
            reused,
            closed_for_writes,
            worker: worker.index(),
            home: self.clone(),
        }
    }
}
