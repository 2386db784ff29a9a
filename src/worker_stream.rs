//! A worker connection's socket, which goes on reading after its writes fail.
//!
//! A worker may answer from a request's head alone (413 for an upload too large) and close
//! without reading the rest. Writing the rest then fails (EPIPE, ECONNRESET), and hyper would
//! fail the whole exchange, a 502, before reading the answer already waiting in the socket.
//! So once a write fails that way, the rest of the request is discarded as if written and
//! hyper goes on to read the worker's answer; the connection is never reused after that.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The socket, and whether the worker stopped taking what is written.
pub struct WorkerStream {
    stream: TcpStream,
    closed_for_writes: Arc<AtomicBool>,
}

impl WorkerStream {
    /// Wraps `stream`; the flag turns true once a write found the worker gone.
    pub fn new(stream: TcpStream) -> (Self, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(false));
        let wrapped = Self {
            stream,
            closed_for_writes: flag.clone(),
        };
        (wrapped, flag)
    }

    fn closed(&self) -> bool {
        self.closed_for_writes.load(Ordering::Relaxed)
    }

    /// A write error that means the worker stopped reading, which it may have answered.
    fn swallow(&self, error: &io::Error) -> bool {
        let gone = matches!(
            error.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        );
        if gone {
            self.closed_for_writes.store(true, Ordering::Relaxed);
        }
        gone
    }
}

impl AsyncRead for WorkerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WorkerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closed() {
            return Poll::Ready(Ok(buf.len()));
        }
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Ready(Err(e)) if this.swallow(&e) => Poll::Ready(Ok(buf.len())),
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closed() {
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut this.stream).poll_flush(cx) {
            Poll::Ready(Err(e)) if this.swallow(&e) => Poll::Ready(Ok(())),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
