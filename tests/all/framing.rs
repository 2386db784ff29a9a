//! HTTP framing at both edges: how worker answers are framed and relayed, and what clients
//! that do unusual but legal things (half-close, `Expect: 100-continue`) receive.

use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{eventually, mock, mock_with, parse, router, router_with};

/// A worker that answers `POST /generate` with `answer` (and `{}` to anything else), one
/// request per connection, closing after it.
async fn canned_worker(answer: &'static [u8]) -> Result<(String, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let head = read_head(&mut stream).await;
                let reply: &[u8] = if head.starts_with(b"POST /generate") {
                    answer
                } else {
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
                };
                let _ = stream.write_all(reply).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok((url, task))
}

async fn read_head(stream: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    head
}

/// Everything the router sends back on a raw connection until it closes (or 10 s pass).
async fn read_all(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_worker_answer_with_both_length_and_chunks_is_read_as_chunked() -> Result<()> {
    // RFC 9112 §6.3: chunked wins. Relaying the stale length cut the body to 5 bytes.
    let (url, worker) = canned_worker(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\
          transfer-encoding: chunked\r\nconnection: close\r\n\r\n\
          8\r\n{\"text\":\r\nf\r\n\"hello, chunks\"\r\n1\r\n}\r\n0\r\n\r\n",
    )
    .await?;
    let r = router(|c| c.worker_urls = vec![url]).await?;
    let (status, body) = r.post("/generate", &json!({"text": "x"})).await?;
    assert_eq!((status, body), (200, json!({"text": "hello, chunks"})));
    worker.abort();
    Ok(())
}

#[tokio::test]
async fn an_unasked_101_from_a_worker_gets_502_json() -> Result<()> {
    let (url, worker) = canned_worker(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    )
    .await?;
    let r = router(|c| c.worker_urls = vec![url]).await?;
    let (status, body) = r.post("/generate", &json!({"text": "x"})).await?;
    assert_eq!(status, 502, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("101"), "{body}");
    worker.abort();
    Ok(())
}

#[tokio::test]
async fn an_oversized_upload_that_expects_100_continue_gets_413_first() -> Result<()> {
    let a = mock().await?;
    let url = a.url();
    let r = router(|c| {
        c.worker_urls = vec![url];
        c.max_request_body_mib = 1;
    })
    .await?;
    let mut stream = TcpStream::connect(r.router.addr()).await?;
    let head = "POST /generate HTTP/1.1\r\nhost: x\r\ncontent-length: 2000000\r\n\
                expect: 100-continue\r\n\r\n";
    stream.write_all(head.as_bytes()).await?;
    // The client waits for 100 Continue before it sends anything more.
    let answer = read_all(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert!(parse(body.as_bytes())?["error"].is_string(), "{answer}");
    assert_eq!(a.requests(), 0);
    Ok(())
}

#[tokio::test]
async fn a_client_that_half_closes_after_its_request_still_gets_the_answer() -> Result<()> {
    // The worker takes a while, so the router reads the client's EOF before it can answer.
    let a = mock_with(mock_worker::MockConfig {
        delay: Duration::from_millis(300),
        ..mock_worker::MockConfig::default()
    })
    .await?;
    let r = router_with(&[&a]).await?;
    let mut stream = TcpStream::connect(r.router.addr()).await?;
    let body = r#"{"text": "hi"}"#;
    let request = format!(
        "POST /generate HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    stream.shutdown().await?;
    let answer = read_all(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains("\"text\""), "{answer}");
    Ok(())
}

#[tokio::test]
async fn idle_worker_connections_close_after_a_burst() -> Result<()> {
    // Held 200 ms each, 80 concurrent requests open about 80 worker connections. Left idle,
    // they used to stay open until the worker closed them (SGLang after 5 s, the mock never).
    let a = mock_with(mock_worker::MockConfig {
        delay: Duration::from_millis(200),
        ..mock_worker::MockConfig::default()
    })
    .await?;
    let r = router_with(&[&a]).await?;
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..80 {
        let client = reqwest::Client::builder().no_proxy().build()?;
        let url = r.url("/generate");
        burst.spawn(async move { client.post(url).body(r#"{"text":"x"}"#).send().await });
    }
    while let Some(done) = burst.join_next().await {
        assert_eq!(done??.status(), 200);
    }
    assert!(
        a.max_in_flight() > 32,
        "the burst was not concurrent: {}",
        a.max_in_flight()
    );
    // What stays is the health prober's own keep-alive connection, at most one per thread.
    let left = eventually(15.0, async || Ok(a.open_connections() <= 2)).await;
    assert!(
        left.is_ok(),
        "{} worker connections still open",
        a.open_connections()
    );
    Ok(())
}

#[tokio::test]
async fn requests_the_parser_refuses_get_json_answers() -> Result<()> {
    let a = mock().await?;
    let r = router_with(&[&a]).await?;
    let long_uri = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000));
    let huge_header = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "b".repeat(600_000)
    );
    let cases = [
        (
            "GET / HTTP/1.1\r\nhost: x\r\nno colon here\r\n\r\n".to_owned(),
            "400",
        ),
        (long_uri, "414"),
        (huge_header, "431"),
    ];
    for (request, status) in cases {
        let mut stream = TcpStream::connect(r.router.addr()).await?;
        // The router may answer and close before taking every byte of a huge head.
        let _ = stream.write_all(request.as_bytes()).await;
        let answer = read_all(&mut stream).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{status}: {answer:.200}"
        );
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        assert!(
            parse(body.as_bytes())?["error"].is_string(),
            "{answer:.300}"
        );
    }
    // After a good request on the same connection, a bad one is still the parser's.
    let mut stream = TcpStream::connect(r.router.addr()).await?;
    stream
        .write_all(b"GET /workers HTTP/1.1\r\nhost: x\r\n\r\nGET / HTTP/1.1\r\nbad header\r\n\r\n")
        .await?;
    let answer = read_all(&mut stream).await;
    let second = answer.split("HTTP/1.1 ").nth(2).unwrap_or_default();
    assert!(second.starts_with("400"), "{answer}");
    assert!(
        second.contains("application/json") && second.contains("\"error\""),
        "{answer}"
    );
    Ok(())
}

#[tokio::test]
async fn a_worker_answering_before_it_reads_the_body_is_relayed() -> Result<()> {
    // A worker may refuse an upload from its head alone (413) and close without reading it.
    let (url, worker) = canned_worker(
        b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: 22\r\n\
          connection: close\r\n\r\n{\"error\":\"too large!\"}",
    )
    .await?;
    let r = router(|c| c.worker_urls = vec![url]).await?;
    let body = format!(r#"{{"text": "{}"}}"#, "x".repeat(8 << 20));
    let (status, answer) = r.post_raw("/generate", body).await?;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(parse(&answer)?["error"], "too large!");
    worker.abort();
    Ok(())
}
