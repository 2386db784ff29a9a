//! Graceful shutdown: in-flight requests finish, new ones are refused.

use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::json;

use crate::common::{eventually, mock, router_with, spawn_router};

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() -> Result<()> {
    let a = mock().await?;
    let r = router_with(&[&a]).await?;
    let (client, url, base) = (r.client.clone(), r.url("/generate"), r.base.clone());
    let slow = tokio::spawn(async move {
        client
            .post(url)
            .header("x-mock-delay-ms", "400")
            .body(json!({"text": "x"}).to_string())
            .send()
            .await
    });
    eventually(2.0, async || Ok(a.in_flight() == 1)).await?;
    r.router.shutdown().await;
    let response = slow.await??;
    assert_eq!(
        response.status().as_u16(),
        200,
        "the in-flight request completed"
    );
    assert!(
        reqwest::get(format!("{base}/list_workers")).await.is_err(),
        "no new connections after shutdown"
    );
    Ok(())
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() -> Result<()> {
    let a = mock().await?;
    let (mut child, addr) = spawn_router(&[], &["--worker-urls", &a.url()]).await?;
    let client = reqwest::Client::new();
    let slow = tokio::spawn(
        client
            .post(format!("http://{addr}/generate"))
            .header("x-mock-delay-ms", "500")
            .body(json!({"text": "x"}).to_string())
            .send(),
    );
    eventually(2.0, async || Ok(a.in_flight() == 1)).await?;
    let pid = child.id().context("pid")?;
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    assert_eq!(slow.await??.status().as_u16(), 200);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await??;
    assert!(status.success(), "exit status {status}");
    Ok(())
}

#[tokio::test]
async fn a_second_router_cannot_share_a_busy_port() -> Result<()> {
    let first = crate::common::router(|_| {}).await?;
    let port = first.router.addr().port();
    let second = crate::common::router(|c| c.sglang_router_port = port).await;
    let error = second
        .err()
        .context("a second router bound the same port")?;
    assert!(format!("{error:#}").contains("cannot listen"), "{error:#}");
    Ok(())
}
