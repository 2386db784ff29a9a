//! Faults a worker's host can cause without answering: connects that hang, bodies that stall.

use anyhow::Result;
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};

use guest_artifacts::PROBE;

use crate::common::{eventually, mock, mw, router, spawn_router};

/// A listener on 127.0.0.1 whose accept queue is full, so that further connects hang as they
/// do to a powered-off host that drops SYNs. Returns its url and what keeps it so.
async fn black_hole() -> Result<(String, Vec<impl Sized>)> {
    let socket = TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let listener = socket.listen(0)?;
    let addr = listener.local_addr()?;
    let mut held = Vec::new();
    // With a backlog of 0 the queue holds one connection; a few more make sure it is full.
    for _ in 0..3 {
        let attempt = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            TcpStream::connect(addr),
        );
        if let Ok(Ok(stream)) = attempt.await {
            held.push(stream);
        }
    }
    anyhow::ensure!(!held.is_empty(), "could not fill the accept queue");
    Ok((format!("http://{addr}"), vec![(listener, held)]))
}

#[tokio::test]
async fn a_worker_whose_connects_hang_loses_its_requests_to_a_live_one() -> Result<()> {
    let (hole, _keep) = black_hole().await?;
    let live = mock().await?;
    let urls = vec![hole.clone(), live.url()];
    let r = router(|c| {
        c.worker_urls = urls;
        c.slime_router_timeout = Some(1.0);
        c.connect_timeout_secs = 0.3;
        c.slime_router_health_check_failure_threshold = 2;
    })
    .await?;
    // Ties go either way at random until the hole is DEAD; 24 requests make missing its two
    // failures a one-in-a-million event.
    for _ in 0..24 {
        let (status, body) = r.post("/generate", &json!({"text": "x"})).await?;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        live.requests(),
        24,
        "every request ended on the live worker"
    );
    eventually(2.0, async || {
        let workers = r.workers().await?;
        Ok(workers
            .iter()
            .any(|(url, _, healthy)| *url == hole && !healthy))
    })
    .await?;
    Ok(())
}

/// A worker that answers `/generate` with a head and half a body, then stalls; anything
/// else gets an empty JSON object.
async fn stalls_mid_body() -> Result<(String, tokio::task::JoinHandle<()>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut byte = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut byte).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&byte[..n]),
                }
            }
            let answer: &[u8] = if head.starts_with(b"POST /generate") {
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"text\":"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
            };
            let _ = stream.write_all(answer).await;
            held.push(stream);
        }
    });
    Ok((url, task))
}

#[tokio::test]
async fn a_body_stalling_under_a_buffering_middleware_times_out() -> Result<()> {
    let (url, server) = stalls_mid_body().await?;
    let r = router(|c| {
        c.worker_urls = vec![url];
        c.slime_router_middleware_paths = vec![mw(PROBE, "resp_json=1")];
        c.slime_router_timeout = Some(0.5);
    })
    .await?;
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        r.post("/generate", &json!({"text": "x"})),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the client hung on a stalled body"))??;
    assert_eq!(answer.0, 502, "{}", answer.1);
    assert!(
        answer.1["error"]
            .as_str()
            .is_some_and(|e| e.contains("sent nothing"))
    );
    server.abort();
    Ok(())
}

#[tokio::test]
async fn a_client_trickling_its_body_gets_408() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = mock().await?;
    let url = a.url();
    let r = router(|c| {
        c.worker_urls = vec![url];
        c.client_body_timeout_secs = 0.5;
    })
    .await?;
    let mut stream = TcpStream::connect(r.router.addr()).await?;
    let head = "POST /generate HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{";
    stream.write_all(head.as_bytes()).await?;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            // A byte now and then: each is progress, none finishes the body.
            let _ = stream.write_all(b" ").await;
            let mut buf = [0u8; 512];
            tokio::select! {
                n = stream.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                },
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            }
            if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                break;
            }
        }
    })
    .await;
    anyhow::ensure!(read.is_ok(), "the router waited on the trickle");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("--client-body-timeout-secs"), "{text}");
    assert_eq!(a.requests(), 0, "nothing reached the worker");
    Ok(())
}

#[tokio::test]
async fn connections_beyond_the_cap_get_a_fast_503() -> Result<()> {
    use tokio::io::AsyncReadExt;
    let a = mock().await?;
    let url = a.url();
    let r = router(|c| {
        c.worker_urls = vec![url];
        c.max_client_connections = 2;
    })
    .await?;
    // Serving threads accept in any order, so which of three connections is refused is
    // not known; exactly one is, at once and without sending anything.
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(TcpStream::connect(r.router.addr()).await?);
    }
    let mut refused = Vec::new();
    let mut held = Vec::new();
    for mut stream in streams {
        let mut answer = vec![0u8; 512];
        let read = stream.read(&mut answer);
        match tokio::time::timeout(std::time::Duration::from_millis(1500), read).await {
            Ok(Ok(n)) if n > 0 => refused.push(String::from_utf8_lossy(&answer[..n]).into_owned()),
            _ => held.push(stream),
        }
    }
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].starts_with("HTTP/1.1 503"), "{}", refused[0]);
    assert!(
        refused[0].contains("--max-client-connections"),
        "{}",
        refused[0]
    );
    drop(held);
    // Closed connections give their slots back.
    eventually(5.0, async || {
        let client = reqwest::Client::builder().no_proxy().build()?;
        let response = client
            .post(r.url("/generate"))
            .body(r#"{"text":"x"}"#)
            .send()
            .await;
        Ok(response.is_ok_and(|r| r.status() == 200))
    })
    .await
}

/// One HTTP/1.1 exchange on a kept-alive raw connection: status and body.
async fn exchange(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&answer[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if answer.len() >= end + 4 + length {
                let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                let body = String::from_utf8_lossy(&answer[end + 4..end + 4 + length]);
                return Ok((status, body.into_owned()));
            }
        }
        let n = stream.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "the router closed the connection");
        answer.extend_from_slice(&buf[..n]);
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[tokio::test]
async fn running_out_of_file_descriptors_never_blames_a_worker() -> Result<()> {
    use anyhow::Context as _;
    const LIMIT: usize = 64;
    let a = mock().await?;
    // The router in a process of its own with few descriptors (RLIMIT_NOFILE via the shell).
    let limit = format!("ulimit -n {LIMIT} && exec \"$0\" \"$@\"");
    let (child, addr) = spawn_router(&["sh", "-c", &limit], &["--worker-urls", &a.url()]).await?;
    let pid = child.id().context("pid")?;
    let mut client = TcpStream::connect(&addr).await?;
    let (status, _) = exchange(&mut client, "GET", "/workers", "").await?;
    assert_eq!(status, 200);
    // Idle connections take every descriptor the router has left.
    let mut idle = Vec::new();
    for _ in 0..LIMIT * 2 {
        idle.push(TcpStream::connect(&addr).await?);
    }
    eventually(10.0, async || Ok(open_fds(pid) >= LIMIT)).await?;
    let (status, body) = exchange(&mut client, "POST", "/generate", r#"{"text":"x"}"#).await?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("out of resources"), "{body}");
    let (_, workers) = exchange(&mut client, "GET", "/workers", "").await?;
    assert!(workers.contains("\"is_healthy\":true"), "{workers}");
    // Descriptors back, the same worker serves again: it was never counted as failing.
    drop(idle);
    eventually(20.0, async || {
        let (status, _) = exchange(&mut client, "POST", "/generate", r#"{"text":"x"}"#).await?;
        Ok(status == 200)
    })
    .await?;
    let (_, workers) = exchange(&mut client, "GET", "/workers", "").await?;
    assert!(workers.contains("\"is_healthy\":true"), "{workers}");
    assert_eq!(
        a.requests(),
        1,
        "the worker saw only the request that succeeded"
    );
    Ok(())
}
