//! Connections to workers, kept per serving thread. A connection goes back to the idle list
//! only once its response has been read to the end, so a checked-out connection is always
//! ready; a body abandoned half-way takes its connection with it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::worker::Worker;

/// Bounds connecting to a worker that silently drops packets.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections older than this are not reused: servers close idle keep-alive
/// connections (uvicorn, which serves SGLang, after 5 s), and a request sent on one being
/// closed is lost.
const MAX_IDLE: Duration = Duration::from_secs(4);

pub type Sender = SendRequest<Full<Bytes>>;

/// One serving thread's idle connections, by worker id.
#[derive(Default)]
pub struct Connections {
    idle: Mutex<Vec<Vec<(Instant, Sender)>>>,
}

/// A connection in use.
pub struct Conn {
    pub sender: Sender,
    /// Whether it served a request before (a failure on it may just be a stale connection).
    pub reused: bool,
    worker: usize,
    home: Arc<Connections>,
}

impl Conn {
    /// Returns the connection for reuse; call only after its response was read to the end.
    pub fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        let mut idle = self.home.lock();
        if idle.len() <= self.worker {
            idle.resize_with(self.worker + 1, Vec::new);
        }
        idle[self.worker].push((Instant::now(), self.sender));
    }
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<(Instant, Sender)>>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An idle connection to `worker`, or a new one.
    pub async fn get(self: &Arc<Self>, worker: &Worker) -> Result<Conn, String> {
        while let Some(mut sender) = self.pop(worker.index()) {
            if sender.ready().await.is_ok() {
                return Ok(self.conn(sender, worker, true));
            }
        }
        self.connect(worker).await
    }

    fn pop(&self, worker: usize) -> Option<Sender> {
        let mut idle = self.lock();
        let list = idle.get_mut(worker)?;
        while let Some((since, sender)) = list.pop() {
            if since.elapsed() < MAX_IDLE && !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    /// A new connection to `worker`, driven by a task of its own on this thread.
    pub async fn connect(self: &Arc<Self>, worker: &Worker) -> Result<Conn, String> {
        let address = worker.authority().as_str();
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| format!("connect timed out after {}s", CONNECT_TIMEOUT.as_secs()))?
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(self.conn(sender, worker, false))
    }

    fn conn(self: &Arc<Self>, sender: Sender, worker: &Worker, reused: bool) -> Conn {
        Conn {
            sender,
            reused,
            worker: worker.index(),
            home: self.clone(),
        }
    }
}
