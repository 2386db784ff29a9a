//! Faults a worker's host can cause without ever answering: connects that hang.

use anyhow::Result;
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};

use crate::common::{eventually, mock, router};

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
    for _ in 0..12 {
        let (status, body) = r.post("/generate", &json!({"text": "x"})).await?;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        live.requests(),
        12,
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
