//! Bodies: reading a client's request body under the size cap, and the response body type
//! the server sends: a buffered body, a worker's body streamed through untouched (carrying
//! the in-flight guard, permit and connection until it ends or is dropped), or frames
//! produced by a streaming middleware task.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::{Instant, Sleep};

use crate::error::RouterError;
use crate::pool::InFlight;
use crate::upstream::Conn;

pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Everything a proxied request holds until its response body is finished: the worker's
/// in-flight slot, the connection permit, and the connection itself.
pub struct Lease {
    pub slot: InFlight,
    _permit: OwnedSemaphorePermit,
    conn: Option<Conn>,
}

impl Lease {
    pub fn new(slot: InFlight, permit: OwnedSemaphorePermit, conn: Conn) -> Self {
        Self {
            slot,
            _permit: permit,
            conn: Some(conn),
        }
    }

    /// Ends the lease after the response was read to the end: the connection is reused.
    /// Dropping a lease instead closes the connection, which is right for a body cut short.
    pub fn complete(mut self) {
        if let Some(conn) = self.conn.take() {
            conn.release();
        }
    }
}

pub enum RouterBody {
    Full(Option<Bytes>),
    Upstream(UpstreamBody),
    Channel(mpsc::Receiver<Result<Frame<Bytes>, BodyError>>),
}

impl RouterBody {
    pub fn full(bytes: Bytes) -> Self {
        Self::Full((!bytes.is_empty()).then_some(bytes))
    }

    pub fn empty() -> Self {
        Self::Full(None)
    }

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

/// How much of an oversized body is still read (and thrown away) so the client, which is
/// usually still sending, receives the 413 instead of a connection reset.
const DRAIN_LIMIT: usize = 64 << 20;

/// Reads a whole request body, refusing more than `limit` bytes (413).
pub async fn read_request(
    headers: &HeaderMap,
    mut body: Incoming,
    limit: usize,
) -> Result<Bytes, RouterError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        if declared.is_some_and(|len| len - limit <= DRAIN_LIMIT) {
            drain(&mut body, limit.saturating_add(DRAIN_LIMIT)).await;
        }
        return Err(RouterError::BodyTooLarge { limit });
    }
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            RouterError::BadRequest(format!("could not read the request body: {e}"))
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len();
        if total > limit {
            drain(&mut body, DRAIN_LIMIT).await;
            return Err(RouterError::BodyTooLarge { limit });
        }
        chunks.push(data);
    }
    // One frame (the usual case) is returned as is, without a copy.
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => Bytes::from(chunks.concat()),
    })
}

/// Reads and discards up to `budget` more bytes.
async fn drain(body: &mut Incoming, budget: usize) {
    let mut seen = 0usize;
    while seen <= budget {
        match body.frame().await {
            Some(Ok(frame)) => seen += frame.data_ref().map_or(0, Bytes::len),
            _ => return,
        }
    }
}
