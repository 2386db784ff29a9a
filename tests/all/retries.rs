//! When a request may go to another worker: never after a worker may have run it, once when
//! a reused idle connection turned out closed before any answer, and as often as there are
//! live workers when nothing was sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use mock_worker::{MockConfig, MockWorker};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{TestRouter, mock_with, router_with};

/// How a worker drops a connection: a FIN, or a reset (as a killed process's socket does).
#[derive(Clone, Copy)]
enum Drop {
    Close,
    Reset,
}

/// A worker that answers anything but `/generate` with `{}`; of the `/generate` requests on a
/// connection, the first `answered` get `{"text":"ok"}` and the next is read, then the
/// connection dropped without an answer. Counts the `/generate` requests it read.
async fn closes_after(answered: usize, how: Drop) -> Result<(String, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let generates = Arc::new(AtomicUsize::new(0));
    let count = generates.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream, answered, how, count.clone()));
        }
    });
    Ok((url, generates))
}

async fn serve(mut stream: TcpStream, answered: usize, how: Drop, generates: Arc<AtomicUsize>) {
    let mut served = 0;
    loop {
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        // The router's requests here are small: head and body arrive together.
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let body: &[u8] = if request.starts_with(b"POST /generate") {
            generates.fetch_add(1, Ordering::SeqCst);
            if served == answered {
                if let Drop::Reset = how {
                    let _ = stream.set_zero_linger();
                }
                return;
            }
            served += 1;
            br#"{"text":"ok"}"#
        } else {
            b"{}"
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(body).await;
    }
}

/// A router in front of a slow mock that is kept busy with one stream, so that a worker
/// registered next (with nothing in flight) gets the next requests.
async fn busy_mock_then(url: &str) -> Result<(MockWorker, TestRouter, reqwest::Response)> {
    let mock = mock_with(MockConfig {
        tokens_per_second: 2.0,
        ..MockConfig::default()
    })
    .await?;
    let r = router_with(&[&mock]).await?;
    let body = json!({"text": "x", "stream": true, "sampling_params": {"max_new_tokens": 200}});
    let mut stream = r
        .client
        .post(r.url("/generate"))
        .body(body.to_string())
        .send()
        .await?;
    stream.chunk().await?.context("no first event")?;
    let (status, answer) = r.post("/workers", &json!({"url": url})).await?;
    anyhow::ensure!(status == 200, "{answer}");
    Ok((mock, r, stream))
}

#[tokio::test]
async fn a_request_a_worker_read_and_never_answered_is_not_sent_again() -> Result<()> {
    let (url, generates) = closes_after(0, Drop::Close).await?;
    let (mock, r, _stream) = busy_mock_then(&url).await?;
    let (status, answer) = r.post("/generate", &json!({"text": "once"})).await?;
    // It may have run there: the client hears, and the other worker never sees it.
    assert_eq!(status, 502, "{answer}");
    assert!(
        answer["error"].as_str().is_some_and(|e| e.contains(&url)),
        "{answer}"
    );
    assert_eq!(generates.load(Ordering::SeqCst), 1);
    assert_eq!(mock.requests(), 1, "only the stream reached the mock");
    Ok(())
}

#[tokio::test]
async fn a_request_lost_on_a_stale_connection_goes_once_to_another_worker() -> Result<()> {
    lost_on_a_reused_connection(Drop::Close).await
}

#[tokio::test]
async fn a_request_reset_on_a_reused_connection_goes_once_to_another_worker() -> Result<()> {
    lost_on_a_reused_connection(Drop::Reset).await
}

async fn lost_on_a_reused_connection(how: Drop) -> Result<()> {
    let (url, generates) = closes_after(1, how).await?;
    let (mock, r, _stream) = busy_mock_then(&url).await?;
    // One client connection, so both requests come through one serving thread and its pool.
    let (first, _) = r.post("/generate", &json!({"text": "a"})).await?;
    assert_eq!(first, 200);
    // The worker connection goes back to the idle list as its body ends, which the client
    // cannot observe; give it that moment rather than race it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (second, answer) = r.post("/generate", &json!({"text": "b"})).await?;
    // The worker closed the reused connection on reading it: it never ran, so it went once
    // more, to the other worker, and not again to the one that dropped it.
    assert_eq!(second, 200, "{answer}");
    assert_eq!(generates.load(Ordering::SeqCst), 2);
    assert_eq!(mock.requests(), 2, "the stream and the retried request");
    assert!(
        answer["text"].as_str().is_some_and(|t| t != "ok"),
        "{answer}"
    );
    Ok(())
}
