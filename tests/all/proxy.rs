//! Forwarding: bytes, methods and queries unchanged, least-in-flight spread, failover.

use anyhow::Result;
use mock_worker::MockConfig;
use serde_json::json;

use crate::common::{eventually, mock, mock_with, router, router_with};

#[tokio::test]
async fn bodies_queries_and_methods_pass_through_byte_exact() -> Result<()> {
    let a = mock().await?;
    let r = router_with(&[&a]).await?;
    // Re-serialising JSON would turn 1e-7 into 1e-07 or 0.0000001 and reorder keys.
    let body = r#"{"z": 1e-7, "a": [1.10, -0.0], "text": "caf\u00e9 \ud83d\ude00"}"#;
    let response = r
        .client
        .post(r.url("/echo?b=2&a=1&sp=%20x"))
        .header("content-type", "application/json")
        .header("x-custom", "kept")
        .body(body)
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["x-echo-path"], "/echo?b=2&a=1&sp=%20x");
    assert_eq!(response.content_length(), Some(body.len() as u64));
    assert_eq!(response.bytes().await?, body.as_bytes());
    let seen = a
        .last_seen()
        .ok_or_else(|| anyhow::anyhow!("worker saw nothing"))?;
    assert_eq!(seen.body, body.as_bytes());
    assert_eq!(seen.headers["x-custom"], "kept");
    for method in ["PUT", "DELETE", "PATCH", "GET"] {
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let response = r
            .client
            .request(method.clone(), r.url("/echo?m=1"))
            .body("x")
            .send()
            .await?;
        assert_eq!(response.headers()["x-echo-method"], method.as_str());
    }
    Ok(())
}

#[tokio::test]
async fn concurrent_slow_requests_spread_over_workers() -> Result<()> {
    let (a, b, c) = (mock().await?, mock().await?, mock().await?);
    let r = router_with(&[&a, &b, &c]).await?;
    let send = || {
        r.client
            .post(r.url("/generate"))
            .header("x-mock-delay-ms", "300")
            .body(json!({"text": "slow"}).to_string())
            .send()
    };
    let (x, y, z) = tokio::join!(send(), send(), send());
    for response in [x?, y?, z?] {
        assert_eq!(response.status().as_u16(), 200);
    }
    assert_eq!(
        [a.requests(), b.requests(), c.requests()],
        [1, 1, 1],
        "one request per worker"
    );
    r.assert_counts_return_to_zero().await
}

#[tokio::test]
async fn no_live_worker_is_503_json() -> Result<()> {
    let r = router(|_| {}).await?;
    let (status, body) = r.post("/generate", &json!({"text": "hi"})).await?;
    assert_eq!(status, 503);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("no live worker"))
    );
    Ok(())
}

#[tokio::test]
async fn timeout_is_504_json() -> Result<()> {
    let a = mock().await?;
    let url = a.url();
    let r = router(|c| {
        c.slime_router_timeout = Some(0.2);
        c.worker_urls = vec![url];
    })
    .await?;
    let response = r
        .client
        .post(r.url("/generate"))
        .header("x-mock-delay-ms", "2000")
        .body("{}")
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 504);
    assert!(
        crate::common::parse(&response.bytes().await?)?["error"]
            .as_str()
            .is_some_and(|e| e.contains("0.2"))
    );
    r.assert_counts_return_to_zero().await
}

/// A port with nothing listening: connects fail fast, like a crashed worker.
async fn dead_url() -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    drop(listener);
    Ok(url)
}

#[tokio::test]
async fn a_fast_failing_worker_attracts_no_traffic_and_goes_dead() -> Result<()> {
    let live = mock().await?;
    let dead = dead_url().await?;
    let urls = vec![dead.clone(), live.url()];
    let r = router(|c| c.worker_urls = urls).await?;
    for _ in 0..20 {
        let (status, _) = r.post("/generate", &json!({"text": "hi"})).await?;
        assert_eq!(status, 200, "connect failures move to the live worker");
    }
    assert_eq!(live.requests(), 20);
    let workers = r.workers().await?;
    assert_eq!(
        workers[0],
        (dead, 0, false),
        "listed, but DEAD after the threshold"
    );
    Ok(())
}

#[tokio::test]
async fn killing_a_worker_under_load_fails_no_request_it_was_not_running() -> Result<()> {
    let mut a = mock().await?;
    let b = mock().await?;
    let urls = vec![a.url(), b.url()];
    let r = router(|c| {
        c.worker_urls = urls;
        c.rollout_health_check_interval = 0.05;
    })
    .await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (client, url, stop) = (r.client.clone(), r.url("/generate"), stop.clone());
        load.spawn(async move {
            // Each failure with the moment its request was sent.
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let sent_at = std::time::Instant::now();
                let sent = client
                    .post(&url)
                    .header("x-mock-delay-ms", "5")
                    .body(r#"{"text":"x"}"#)
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status().is_success() => ok += 1,
                    Ok(response) => failed.push((sent_at, response.text().await?)),
                    Err(e) => failed.push((sent_at, e.to_string())),
                }
            }
            anyhow::Ok((ok, failed))
        });
    }
    // Both workers serve the load before the kill, and b serves it alone while a is dead.
    eventually(3.0, async || Ok(a.requests() >= 20 && b.requests() >= 20)).await?;
    let killed_at = std::time::Instant::now();
    a.kill();
    eventually(3.0, async || Ok(!r.workers().await?[0].2)).await?;
    let alone = b.requests();
    eventually(3.0, async || Ok(b.requests() >= alone + 20)).await?;
    a.restart().await?;
    let before = a.requests();
    eventually(3.0, async || Ok(r.workers().await?[0].2)).await?;
    eventually(3.0, async || Ok(a.requests() > before)).await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    while let Some(result) = load.join_next().await {
        let (o, f) = result??;
        ok += o;
        failed.extend(f);
    }
    // A request a was running when it died may have run there, so it is never sent again:
    // its client hears 502 naming a. Every other request succeeds.
    let wrongly: Vec<_> = failed
        .iter()
        .filter(|(sent_at, error)| *sent_at > killed_at || !error.contains(&a.url()))
        .map(|(_, error)| error)
        .collect();
    assert!(wrongly.is_empty(), "failed: {wrongly:?}");
    assert!(
        failed.len() <= 8,
        "one in flight per client at most: {failed:?}"
    );
    assert!(ok > 100, "load ran ({ok} requests)");
    r.assert_counts_return_to_zero().await
}

#[tokio::test]
async fn health_probes_do_not_queue_behind_proxied_traffic() -> Result<()> {
    let a = mock_with(MockConfig::default()).await?;
    let url = a.url();
    let r = router(|c| {
        c.worker_urls = vec![url];
        c.slime_router_max_connections = 1;
        c.rollout_health_check_interval = 0.05;
        c.slime_router_health_check_failure_threshold = 1;
    })
    .await?;
    // The only proxy connection is busy for 2 s; the health loop must still see the worker.
    let busy = r
        .client
        .post(r.url("/generate"))
        .header("x-mock-delay-ms", "2000")
        .body("{\"text\":\"x\"}")
        .send();
    let busy = tokio::spawn(busy);
    eventually(2.0, async || Ok(a.in_flight() == 1)).await?;
    a.set_healthy(false);
    eventually(1.5, async || Ok(!r.workers().await?[0].2)).await?;
    assert_eq!(busy.await??.status().as_u16(), 200);
    Ok(())
}
