//! Event streams through `on-response-chunk`: the worker's `text/event-stream` body is cut
//! at event boundaries, so each hook call sees whole `data: ...\n\n` events, and runs on a
//! task that owns the lease and ends when the stream ends or the client goes away.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;

use super::bindings::ChunkAction;
use super::host::Hook;
use super::instance::Guest;
use crate::body::{BodyError, Lease, RouterBody};
use crate::json::{PROJECT_ABOVE, project_events};
use crate::versions;
use crate::worker::Worker;

/// One middleware's part in a stream, with the state it carries between chunks.
pub struct ChunkHook {
    pub guest: Arc<Guest>,
    pub stash: Option<Vec<u8>>,
}

/// Cuts a byte stream after its last complete event.
#[derive(Default)]
pub struct EventFramer {
    pending: BytesMut,
}

impl EventFramer {
    /// Whole events now available, if any.
    pub fn push(&mut self, data: &[u8]) -> Option<Bytes> {
        self.pending.extend_from_slice(data);
        let end = last_event_end(&self.pending)?;
        Some(self.pending.split_to(end).freeze())
    }

    /// Whatever is left when the stream ends (normally nothing).
    pub fn finish(&mut self) -> Bytes {
        self.pending.split().freeze()
    }
}

/// The end of the last blank line ("\n\n" or "\r\n\r\n") in `bytes`.
fn last_event_end(bytes: &[u8]) -> Option<usize> {
    let lf = bytes.windows(2).rposition(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = bytes
        .windows(4)
        .rposition(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    lf.max(crlf)
}

/// Streams `incoming` through `hooks` (already in call order) on a task of its own.
pub fn spawn(
    hooks: Vec<ChunkHook>,
    request_id: u64,
    incoming: Incoming,
    lease: Lease,
    idle: Option<Duration>,
) -> RouterBody {
    let (tx, rx) = mpsc::channel(8);
    let mut stream = Stream {
        hooks,
        request_id,
        tx,
    };
    tokio::spawn(async move {
        if stream.pump(incoming, lease.slot.worker(), idle).await {
            lease.complete();
        }
    });
    RouterBody::Channel(rx)
}

struct Stream {
    hooks: Vec<ChunkHook>,
    request_id: u64,
    tx: mpsc::Sender<Result<Frame<Bytes>, BodyError>>,
}

impl Stream {
    /// Forwards until the worker's body ends (true: read to the end) or the stream breaks.
    async fn pump(
        &mut self,
        mut incoming: Incoming,
        worker: &Worker,
        idle: Option<Duration>,
    ) -> bool {
        let mut framer = EventFramer::default();
        loop {
            let next = tokio::select! {
                biased;
                _ = self.tx.closed() => return false,
                next = next_data(&mut incoming, idle) => next,
            };
            match next {
                Ok(Some(data)) => {
                    if let Some(version) = versions::scan(&data) {
                        worker.observe_version(version);
                    }
                    if let Some(events) = framer.push(&data)
                        && !self.forward(events, false).await
                    {
                        return false;
                    }
                }
                Ok(None) => {
                    let rest = framer.finish();
                    self.forward(rest, true).await;
                    return true;
                }
                Err(error) => {
                    let _ = self.tx.send(Err(error)).await;
                    return false;
                }
            }
        }
    }

    /// Runs `events` through every hook and sends what is left; false once the stream is
    /// over (client gone or a fail-closed middleware failed).
    async fn forward(&mut self, mut events: Bytes, last: bool) -> bool {
        for hook in &mut self.hooks {
            if events.is_empty() && !last {
                break;
            }
            let stash = hook.stash.take();
            let fields = &hook.guest.manifest.response_fields;
            let chunk = if fields.is_empty() || events.len() <= PROJECT_ABOVE {
                events.clone()
            } else {
                Bytes::from(project_events(&events, fields))
            };
            let id = self.request_id;
            let input = chunk.len() + stash.as_ref().map_or(0, Vec::len);
            let result = hook
                .guest
                .hook(
                    Hook::Chunk,
                    input,
                    async |slot| {
                        let (handler, store) = slot.parts();
                        handler
                            .call_on_response_chunk(store, id, &chunk, last, stash.as_deref())
                            .await
                    },
                    Ok,
                )
                .await;
            match result {
                Ok(result) => {
                    hook.stash = result.stash.or(stash);
                    match result.action {
                        ChunkAction::Pass => {}
                        ChunkAction::Replace(bytes) => events = Bytes::from(bytes),
                        ChunkAction::Drop => events = Bytes::new(),
                    }
                }
                Err(failure) if !hook.guest.fails_open() => {
                    let name = hook.guest.name();
                    let error = format!("middleware {name} failed mid-stream: {}", failure.reason);
                    let _ = self.tx.send(Err(error.into())).await;
                    return false;
                }
                Err(_) => {}
            }
        }
        events.is_empty() || self.tx.send(Ok(Frame::data(events))).await.is_ok()
    }
}

/// The next data bytes (trailers skipped), `None` at the end.
async fn next_data(
    incoming: &mut Incoming,
    idle: Option<Duration>,
) -> Result<Option<Bytes>, BodyError> {
    loop {
        let frame = match idle {
            Some(limit) => tokio::time::timeout(limit, incoming.frame())
                .await
                .map_err(|_| format!("worker sent nothing for {}s", limit.as_secs_f64()))?,
            None => incoming.frame().await,
        };
        match frame {
            None => return Ok(None),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EventFramer;

    #[test]
    fn frames_whole_events() {
        let mut framer = EventFramer::default();
        assert_eq!(framer.push(b"data: 1\n"), None);
        assert_eq!(
            framer.push(b"\ndata: 2\n\nda").as_deref(),
            Some(&b"data: 1\n\ndata: 2\n\n"[..])
        );
        assert_eq!(
            framer.push(b"ta: 3\r\n\r\n").as_deref(),
            Some(&b"data: 3\r\n\r\n"[..])
        );
        assert_eq!(framer.push(b"data: partial").as_deref(), None);
        assert_eq!(&framer.finish()[..], b"data: partial");
    }
}
