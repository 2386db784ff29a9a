//! Prefill/decode pairs: both legs get the bootstrap fields with every other byte kept, the
//! client gets the decode's answer (streamed as it comes), either leg failing is a 502 naming
//! it, and every in-flight count returns to 0 however the request ends.

use anyhow::{Context as _, Result};
use mock_worker::{MockConfig, MockWorker, Role};
use serde_json::{Value, json};

use crate::common::{TestRouter, eventually, mock_with, parse, router, wait_closed};

async fn role(role: Role, tweak: impl FnOnce(&mut MockConfig)) -> Result<MockWorker> {
    let mut config = MockConfig {
        role,
        ..MockConfig::default()
    };
    tweak(&mut config);
    mock_with(config).await
}

/// A router with `prefill` (bootstrap port 8998) and `decode` registered as slime does.
async fn pd_router(prefill: &[&MockWorker], decode: &[&MockWorker]) -> Result<TestRouter> {
    let r = router(|_| {}).await?;
    for p in prefill {
        let body = json!({"url": p.url(), "worker_type": "prefill", "bootstrap_port": 8998});
        assert_eq!(r.post("/workers", &body).await?.0, 200);
    }
    for d in decode {
        let body = json!({"url": d.url(), "worker_type": "decode"});
        assert_eq!(r.post("/workers", &body).await?.0, 200);
    }
    Ok(r)
}

fn last_body(worker: &MockWorker) -> Result<Value> {
    parse(
        &worker
            .last_seen()
            .context("the worker got no request")?
            .body,
    )
}

#[tokio::test]
async fn a_pair_gets_bootstrap_fields_and_the_client_the_decode_answer() -> Result<()> {
    let prefill = role(Role::Prefill, |_| {}).await?;
    let decode = role(Role::Decode, |_| {}).await?;
    let r = pd_router(&[&prefill], &[&decode]).await?;
    let body = r#"{"input_ids":[1,2,3],"sampling_params":{"max_new_tokens":4,"temperature":0.10},"return_logprob":true}"#;
    let (status, answer) = r.post_raw("/generate", body).await?;
    let answer = parse(&answer)?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["output_ids"].as_array().map(Vec::len),
        Some(4),
        "decode generated: {answer}"
    );
    let (sent_p, sent_d) = (
        prefill.last_seen().context("prefill")?,
        decode.last_seen().context("decode")?,
    );
    assert_eq!(sent_p.body, sent_d.body, "both legs get the same body");
    let text = String::from_utf8(sent_d.body.to_vec())?;
    assert!(
        text.starts_with(r#"{"input_ids":[1,2,3],"sampling_params":{"max_new_tokens":4,"temperature":0.10},"return_logprob":true,"bootstrap_host":"127.0.0.1","bootstrap_port":8998,"bootstrap_room":"#),
        "other bytes kept, fields added: {text}"
    );
    let sent = parse(&sent_d.body)?;
    let room = sent["bootstrap_room"].as_u64().context("an integer room")?;
    assert!(room < 1 << 63);
    assert_eq!(
        answer["meta_info"]["bootstrap_room"], room,
        "the decode echoes what it got"
    );
    let length = sent_d
        .headers
        .get("content-length")
        .context("content-length")?;
    assert_eq!(
        length.to_str()?,
        sent_d.body.len().to_string(),
        "framing matches the new body"
    );
    // A second request gets a new room.
    r.post_raw("/generate", body).await?;
    assert_ne!(last_body(&decode)?["bootstrap_room"], room);
    r.assert_counts_return_to_zero().await
}

#[tokio::test]
async fn a_streamed_pair_streams_the_decode_events() -> Result<()> {
    let prefill = role(Role::Prefill, |_| {}).await?;
    let decode = role(Role::Decode, |c| c.tokens_per_second = 50.0).await?;
    let r = pd_router(&[&prefill], &[&decode]).await?;
    let body = json!({"text": "hi", "stream": true, "sampling_params": {"max_new_tokens": 5}});
    let mut response = r
        .client
        .post(r.url("/generate"))
        .body(body.to_string())
        .send()
        .await?;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut events = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        events.extend_from_slice(&chunk);
    }
    let text = String::from_utf8(events)?;
    assert_eq!(text.matches("data: {").count(), 5, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert!(
        text.contains("\"bootstrap_host\":\"127.0.0.1\""),
        "decode events: {text}"
    );
    r.assert_counts_return_to_zero().await
}

#[tokio::test]
async fn a_batch_gets_one_room_per_prompt_on_both_legs() -> Result<()> {
    // The mocks refuse batches (400); what matters is what each leg was sent. The prefill
    // answers late, so the decode's answer comes first and the prefill leg runs to its end.
    let prefill = role(Role::Prefill, |c| {
        c.delay = std::time::Duration::from_millis(50)
    })
    .await?;
    let decode = role(Role::Decode, |_| {}).await?;
    let r = pd_router(&[&prefill], &[&decode]).await?;
    r.post_raw("/generate", r#"{"text":["a","b","c"]}"#).await?;
    eventually(2.0, async || Ok(prefill.last_seen().is_some())).await?;
    let rooms = last_body(&prefill)?["bootstrap_room"].clone();
    let rooms = rooms.as_array().context("a list of rooms")?;
    assert_eq!(rooms.len(), 3);
    assert!(
        rooms
            .iter()
            .all(|r| r.as_u64().is_some_and(|r| r < 1 << 63))
    );
    let distinct: std::collections::HashSet<_> = rooms.iter().map(|r| r.to_string()).collect();
    assert_eq!(distinct.len(), 3);
    assert_eq!(last_body(&decode)?["bootstrap_room"], json!(rooms));
    r.assert_counts_return_to_zero().await
}

#[tokio::test]
async fn either_leg_failing_is_a_502_naming_it() -> Result<()> {
    let failing_prefill = role(Role::Prefill, |c| c.failure_rate = 1.0).await?;
    let decode = role(Role::Decode, |c| {
        c.delay = std::time::Duration::from_millis(200)
    })
    .await?;
    let r = pd_router(&[&failing_prefill], &[&decode]).await?;
    let (status, body) = r.post("/generate", &json!({"text": "hi"})).await?;
    assert_eq!(status, 502, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains(&failing_prefill.url())),
        "{body}"
    );
    r.assert_counts_return_to_zero().await?;

    // A decode worker that dies: the pair moves to the live one, and with none left the
    // client hears which worker failed.
    let prefill = role(Role::Prefill, |_| {}).await?;
    let (mut dead, live) = (
        role(Role::Decode, |_| {}).await?,
        role(Role::Decode, |_| {}).await?,
    );
    let r = pd_router(&[&prefill], &[&dead, &live]).await?;
    dead.kill();
    wait_closed(dead.addr()).await?;
    for _ in 0..4 {
        let (status, body) = r.post("/generate", &json!({"text": "hi"})).await?;
        assert_eq!(status, 200, "a live decode worker serves it: {body}");
    }
    let r = pd_router(&[&prefill], &[&dead]).await?;
    let (status, body) = r.post("/generate", &json!({"text": "hi"})).await?;
    assert_eq!(status, 502, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains(&dead.url())),
        "{body}"
    );
    r.assert_counts_return_to_zero().await
}

#[tokio::test]
async fn a_client_leaving_a_pair_mid_stream_releases_both_counts() -> Result<()> {
    let prefill = role(Role::Prefill, |_| {}).await?;
    let decode = role(Role::Decode, |c| c.tokens_per_second = 20.0).await?;
    let r = pd_router(&[&prefill], &[&decode]).await?;
    let body = json!({"text": "hi", "stream": true, "sampling_params": {"max_new_tokens": 200}});
    let mut response = r
        .client
        .post(r.url("/generate"))
        .body(body.to_string())
        .send()
        .await?;
    response.chunk().await?.context("no first event")?;
    let counts: Vec<u64> = r.workers().await?.iter().map(|w| w.1).collect();
    assert_eq!(
        counts[1], 1,
        "the decode leg is in flight while streaming: {counts:?}"
    );
    drop(response);
    r.assert_counts_return_to_zero().await?;
    eventually(2.0, async || {
        Ok(decode.in_flight() == 0 && prefill.in_flight() == 0)
    })
    .await
}

#[tokio::test]
async fn other_paths_go_to_a_regular_worker_else_to_a_decode_worker() -> Result<()> {
    let prefill = role(Role::Prefill, |_| {}).await?;
    let decode = role(Role::Decode, |_| {}).await?;
    let r = pd_router(&[&prefill], &[&decode]).await?;
    let (status, _) = r.post("/echo", &json!({})).await?;
    assert_eq!(status, 200);
    let seen = decode.last_seen().context("decode")?;
    assert_eq!(seen.path_and_query, "/echo");
    assert!(prefill.last_seen().is_none(), "never a prefill worker");
    let regular = mock_with(MockConfig::default()).await?;
    assert_eq!(
        r.post("/workers", &json!({"url": regular.url()})).await?.0,
        200
    );
    r.post("/echo", &json!({})).await?;
    assert_eq!(regular.requests(), 1);
    // Generation still goes to the pair.
    r.post("/generate", &json!({"text": "hi"})).await?;
    assert_eq!((regular.requests(), prefill.requests()), (1, 1));
    Ok(())
}

#[tokio::test]
async fn without_a_live_prefill_worker_generation_goes_to_regular_workers() -> Result<()> {
    let decode = role(Role::Decode, |_| {}).await?;
    let regular = mock_with(MockConfig::default()).await?;
    let r = pd_router(&[], &[&decode]).await?;
    assert_eq!(
        r.post("/workers", &json!({"url": regular.url()})).await?.0,
        200
    );
    let (status, body) = r.post("/generate", &json!({"text": "hi"})).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!((regular.requests(), decode.requests()), (1, 0));
    Ok(())
}
