//! Server-sent events flow through event by event, and a client leaving mid-stream releases
//! the worker's in-flight slot.

use std::time::Instant;

use anyhow::{Context as _, Result};
use mock_worker::MockConfig;
use serde_json::json;

use crate::common::{mock_with, router_with};

fn slow_stream() -> MockConfig {
    MockConfig {
        tokens_per_second: 20.0,
        ..MockConfig::default()
    }
}

#[tokio::test]
async fn events_arrive_before_the_stream_ends() -> Result<()> {
    let a = mock_with(slow_stream()).await?;
    let r = router_with(&[&a]).await?;
    let started = Instant::now();
    let body = json!({"text": "hi", "stream": true, "sampling_params": {"max_new_tokens": 10}});
    let mut response = r
        .client
        .post(r.url("/generate"))
        .body(body.to_string())
        .send()
        .await?;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let first = response.chunk().await?.context("no first event")?;
    let first_at = started.elapsed();
    assert!(
        first.starts_with(b"data: {"),
        "{:?}",
        String::from_utf8_lossy(&first)
    );
    let mut all = first.to_vec();
    while let Some(chunk) = response.chunk().await? {
        all.extend_from_slice(&chunk);
    }
    let total = started.elapsed();
    assert!(all.ends_with(b"data: [DONE]\n\n"));
    assert_eq!(
        all.windows(6).filter(|w| w == b"data: ").count(),
        11,
        "10 events and [DONE]"
    );
    assert!(
        first_at < total / 2,
        "first event at {first_at:?} of {total:?}: the stream was buffered"
    );
    r.assert_counts_return_to_zero().await
}

#[tokio::test]
async fn a_client_leaving_mid_stream_releases_its_count() -> Result<()> {
    let a = mock_with(slow_stream()).await?;
    let r = router_with(&[&a]).await?;
    let body = json!({"text": "hi", "stream": true, "sampling_params": {"max_new_tokens": 200}});
    let mut response = r
        .client
        .post(r.url("/generate"))
        .body(body.to_string())
        .send()
        .await?;
    response.chunk().await?.context("no first event")?;
    assert_eq!(r.workers().await?[0].1, 1, "counted while streaming");
    drop(response);
    r.assert_counts_return_to_zero().await?;
    // The router dropped its upstream connection too, so the worker stops generating.
    crate::common::eventually(2.0, async || Ok(a.in_flight() == 0)).await?;
    Ok(())
}
