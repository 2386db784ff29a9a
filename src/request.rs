//! Reading a client's request body under the size cap and a deadline. An oversized body is
//! refused with 413, after reading (and discarding) enough of it that the client, which is
//! usually still sending, receives the answer instead of a connection reset; a body still
//! arriving at the deadline gets 408, so a client trickling a byte at a time cannot hold a
//! connection and its buffers forever.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::error::RouterError;

/// How much of an oversized body is still read (and thrown away) so the client, which is
/// usually still sending, receives the 413 instead of a connection reset.
const DRAIN_LIMIT: usize = 64 << 20;

/// Reads a whole request body, refusing more than `limit` bytes (413) and one that takes
/// longer than `deadline` (408).
pub async fn read_request(
    headers: &HeaderMap,
    body: Incoming,
    limit: usize,
    deadline: Duration,
) -> Result<Bytes, RouterError> {
    tokio::time::timeout(deadline, read(headers, body, limit))
        .await
        .map_err(|_| RouterError::ClientTimeout {
            secs: deadline.as_secs_f64(),
        })?
}

async fn read(headers: &HeaderMap, mut body: Incoming, limit: usize) -> Result<Bytes, RouterError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        // A client that waits for `100 Continue` sends no body: reading would make hyper
        // invite it, to upload what is refused anyway.
        if declared.is_some_and(|len| len - limit <= DRAIN_LIMIT) && !expects_continue(headers) {
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

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
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
