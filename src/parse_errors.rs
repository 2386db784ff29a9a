//! JSON bodies for the answers hyper's HTTP/1 parser writes itself.
//!
//! A request hyper cannot parse (a malformed line, headers over its buffer, a URI over 64
//! KiB) never reaches the router: hyper answers 400, 431 or 414 with an empty body and closes.
//! Every other error of ours is JSON, so clients (and the OpenAI client's error parser) read
//! those too. hyper offers no hook for that answer, so the connection's writes go through
//! [`JsonErrors`], which recognises it: a response head written while the router's service
//! has seen no request for it, with one of those statuses and an empty body. Anything else
//! passes through untouched, byte for byte.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A client connection whose parser-error answers get JSON bodies.
pub struct JsonErrors<S> {
    inner: S,
    /// Requests the router's service was handed on this connection (it counts them).
    seen: Arc<AtomicU64>,
    /// Final response heads written so far.
    heads: u64,
    /// A rewritten answer being written, how much of it is out, and the length hyper gave.
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl<S> JsonErrors<S> {
    /// Wraps `inner`; the service must add 1 to `seen` for every request it is handed.
    pub fn new(inner: S, seen: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            seen,
            heads: 0,
            pending: None,
        }
    }

    /// Whether `buf` starts a final response head (not `100 Continue`).
    fn is_head(buf: &[u8]) -> bool {
        buf.starts_with(b"HTTP/1.") && buf.get(9..12) != Some(b"100")
    }

    /// hyper's own answer with a JSON body, if `buf` is one.
    fn rewrite(&self, buf: &[u8]) -> Option<Vec<u8>> {
        if self.heads != self.seen.load(Ordering::Relaxed) {
            return None;
        }
        let message = match buf.get(9..12)? {
            b"400" => "the request is not valid HTTP/1.1 (its request line or a header)",
            b"414" => "the request URI is too long",
            b"431" => "the request headers are too large",
            _ => return None,
        };
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
        // Only a bodiless answer: the whole write is the head.
        if end + 4 != buf.len() {
            return None;
        }
        let head = std::str::from_utf8(&buf[..end + 2]).ok()?;
        let length = head
            .to_ascii_lowercase()
            .find("\r\ncontent-length: 0\r\n")?;
        let body = format!(r#"{{"error":"{message}"}}"#);
        let mut out = Vec::with_capacity(buf.len() + body.len() + 40);
        out.extend_from_slice(&head.as_bytes()[..length]);
        out.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(&head.as_bytes()[length + "\r\ncontent-length: 0".len()..]);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body.as_bytes());
        Some(out)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonErrors<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonErrors<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let head = Self::is_head(buf);
        if this.pending.is_none() {
            match this.rewrite(buf).filter(|_| head) {
                Some(answer) => this.pending = Some((answer, 0, buf.len())),
                None => {
                    let written = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
                    // Counted once written: hyper calls again with the same bytes after
                    // Pending, and a partly written head continues mid-line.
                    this.heads += u64::from(head && written > 0);
                    return Poll::Ready(Ok(written));
                }
            }
        }
        let Some((answer, out, given)) = this.pending.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        while *out < answer.len() {
            let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &answer[*out..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *out += n;
        }
        let given = *given;
        this.pending = None;
        this.heads += 1;
        Poll::Ready(Ok(given))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrapper(seen: u64) -> JsonErrors<()> {
        let mut w = JsonErrors::new((), Arc::new(AtomicU64::new(seen)));
        w.heads = 1;
        w
    }

    #[test]
    fn only_the_parsers_bodiless_answers_are_rewritten() {
        let canned =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let out = wrapper(1)
            .rewrite(canned)
            .map(|o| String::from_utf8_lossy(&o).into_owned());
        let body = r#"{"error":"the request headers are too large"}"#;
        assert_eq!(
            out.as_deref(),
            Some(&*format!(
                "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\ncontent-length: {}\r\ndate: x\r\n\r\n{body}",
                body.len()
            ))
        );
        // The service saw this request: the answer is the router's (or a worker's), untouched.
        assert!(wrapper(2).rewrite(canned).is_none());
        // Other statuses, and answers with a body, are never touched.
        assert!(
            wrapper(1)
                .rewrite(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .is_none()
        );
        assert!(
            wrapper(1)
                .rewrite(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}")
                .is_none()
        );
        assert!(!JsonErrors::<()>::is_head(b"HTTP/1.1 100 Continue\r\n\r\n"));
    }
}
