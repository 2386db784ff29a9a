//! The response body type the server sends: a buffered body, a worker's body streamed
//! through untouched (carrying the in-flight guard and connection permit until it ends or
//! is dropped), or frames produced by a streaming middleware task.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::{Instant, Sleep};

use crate::pool::InFlight;

pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Everything a proxied request holds until its response body is finished.
#[derive(Debug)]
pub struct Lease {
    pub slot: InFlight,
    pub permit: OwnedSemaphorePermit,
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
        Self::Upstream(UpstreamBody { inner, lease, idle })
    }
}

/// A worker's body passed through frame by frame.
pub struct UpstreamBody {
    inner: Incoming,
    lease: Lease,
    idle: Option<IdleTimer>,
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
                self.lease.slot.worker().counters().failures.inc();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let Some(idle) = &mut self.idle else {
                    return Poll::Pending;
                };
                ready!(idle.sleep.as_mut().poll(cx));
                let secs = idle.limit.as_secs_f64();
                let url = self.lease.slot.worker().url();
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
