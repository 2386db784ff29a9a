//! The response body the server sends: a buffered body, a worker's body streamed through
//! untouched (carrying the in-flight guard, permit and connection until it ends or is
//! dropped), or frames produced by a streaming middleware task.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::{Instant, Sleep};

use crate::background::AbortOnDrop;
use crate::rids::RidGuard;
use crate::upstream::Conn;
use crate::versions;
use crate::worker::InFlight;

/// Why a response body stopped early.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Everything a proxied request holds until its response body is finished: the worker's
/// in-flight slot, the connection permit, the connection itself, and for a prefill/decode
/// pair the task still reading the prefill's answer, and the registration of its rids.
pub struct Lease {
    /// The worker's in-flight slot.
    pub slot: InFlight,
    _permit: OwnedSemaphorePermit,
    conn: Option<Conn>,
    companion: Option<AbortOnDrop<()>>,
    _rids: Option<RidGuard>,
}

impl Lease {
    /// Holds all three until the body ends.
    pub fn new(slot: InFlight, permit: OwnedSemaphorePermit, conn: Conn) -> Self {
        Self {
            slot,
            _permit: permit,
            conn: Some(conn),
            companion: None,
            _rids: None,
        }
    }

    /// Also keeps the request's rids registered on its workers until the body ends.
    pub fn with_rids(mut self, rids: Option<RidGuard>) -> Self {
        self._rids = rids;
        self
    }

    /// Also holds `task` (a pair's prefill leg): aborted if this body is cut short, left to
    /// finish if it ends normally.
    pub fn with_companion(mut self, task: AbortOnDrop<()>) -> Self {
        self.companion = Some(task);
        self
    }

    /// Ends the lease after the response was read to the end: the connection is reused.
    /// Dropping a lease instead closes the connection, which is right for a body cut short.
    pub fn complete(mut self) {
        if let Some(conn) = self.conn.take() {
            conn.release();
        }
        if let Some(companion) = self.companion.take() {
            companion.detach();
        }
    }
}

/// Every response the router sends has this body.
pub enum RouterBody {
    /// Bytes at once (the router's own answers, buffered middleware results).
    Full(Option<Bytes>),
    /// A worker's body, frame by frame.
    Upstream(UpstreamBody),
    /// Frames from a task (event streams through middleware).
    Channel(mpsc::Receiver<Result<Frame<Bytes>, BodyError>>),
}

impl RouterBody {
    /// A body of these bytes.
    pub fn full(bytes: Bytes) -> Self {
        Self::Full((!bytes.is_empty()).then_some(bytes))
    }

    /// No body.
    pub fn empty() -> Self {
        Self::Full(None)
    }

    /// A worker's body passed through, holding `lease` until it ends; with `idle_timeout`,
    /// a worker that sends nothing for that long ends it with an error.
    pub fn upstream(inner: Incoming, lease: Lease, idle_timeout: Option<Duration>) -> Self {
        let idle = idle_timeout.map(|limit| IdleTimer {
            limit,
            sleep: Box::pin(tokio::time::sleep(limit)),
        });
        Self::Upstream(UpstreamBody {
            inner,
            lease: Some(lease),
            idle,
        })
    }
}

/// A worker's body passed through frame by frame.
pub struct UpstreamBody {
    inner: Incoming,
    lease: Option<Lease>,
    idle: Option<IdleTimer>,
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take()
            && self.inner.is_end_stream()
        {
            lease.complete();
        }
    }
}

struct IdleTimer {
    limit: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl UpstreamBody {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(lease)) = (frame.data_ref(), &self.lease)
                    && let Some(version) = versions::scan(data)
                {
                    lease.slot.worker().observe_version(version);
                }
                if let Some(idle) = &mut self.idle {
                    idle.sleep.as_mut().reset(Instant::now() + idle.limit);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(lease) = self.lease.take() {
                    lease.slot.worker().counters().failures.inc();
                }
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                if let Some(lease) = self.lease.take() {
                    lease.complete();
                }
                Poll::Ready(None)
            }
            Poll::Pending => {
                let Some(idle) = &mut self.idle else {
                    return Poll::Pending;
                };
                ready!(idle.sleep.as_mut().poll(cx));
                // A paused worker holds its requests on purpose: wait for it again.
                if self
                    .lease
                    .as_ref()
                    .is_some_and(|l| l.slot.worker().is_paused())
                {
                    idle.sleep.as_mut().reset(Instant::now() + idle.limit);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                let secs = idle.limit.as_secs_f64();
                // Dropping the lease closes the connection: the response was cut short.
                let url = self.lease.take().map(|l| l.slot.worker().url().to_owned());
                let url = url.unwrap_or_default();
                Poll::Ready(Some(Err(
                    format!("worker {url} sent nothing for {secs}s").into()
                )))
            }
        }
    }
}

impl Body for RouterBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Upstream(upstream) => upstream.poll(cx),
            Self::Channel(rx) => rx.poll_recv(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(bytes) => bytes.is_none(),
            Self::Upstream(upstream) => upstream.inner.is_end_stream(),
            Self::Channel(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Upstream(upstream) => upstream.inner.size_hint(),
            Self::Channel(_) => SizeHint::default(),
        }
    }
}
