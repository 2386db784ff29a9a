//! The example middleware in middleware-examples/, loaded the way a user loads them.

use std::collections::HashMap;

use anyhow::{Context as _, Result};
use guest_artifacts::{AFFINITY_ROUTER, API_KEY_AUTH, NOOP, REQUEST_ID};
use serde_json::json;

use crate::common::{mock, mw, parse, router_mw};

#[tokio::test]
async fn noop_changes_nothing() -> Result<()> {
    let a = mock().await?;
    let r = router_mw(&[mw(NOOP, "")], &[&a]).await?;
    let body = r#"{"text": "x", "p": 1e-7}"#;
    let response = r.client.post(r.url("/echo?q=1")).body(body).send().await?;
    assert_eq!(response.headers()["x-echo-path"], "/echo?q=1");
    assert_eq!(response.bytes().await?, body.as_bytes());
    Ok(())
}

#[tokio::test]
async fn request_id_is_added_upstream_and_echoed() -> Result<()> {
    let a = mock().await?;
    let r = router_mw(&[mw(REQUEST_ID, "")], &[&a]).await?;
    let response = r
        .client
        .post(r.url("/generate"))
        .body(r#"{"text":"x"}"#)
        .send()
        .await?;
    let id = response.headers()["x-request-id"].to_str()?.to_owned();
    assert!(!id.is_empty());
    assert_eq!(
        a.last_seen().context("seen")?.headers["x-request-id"],
        id.as_str()
    );
    let response = r
        .client
        .post(r.url("/generate"))
        .header("x-request-id", "mine")
        .body(r#"{"text":"x"}"#)
        .send()
        .await?;
    assert_eq!(
        response.headers()["x-request-id"],
        "mine",
        "a client's id is kept"
    );
    Ok(())
}

#[tokio::test]
async fn api_key_auth_rejects_with_401_json_and_strips_credentials() -> Result<()> {
    let a = mock().await?;
    let r = router_mw(&[mw(API_KEY_AUTH, "keys=alpha,beta")], &[&a]).await?;
    let response = r
        .client
        .post(r.url("/generate"))
        .body(r#"{"text":"x"}"#)
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 401);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(
        parse(&response.bytes().await?)?,
        json!({"error": "missing or invalid API key"})
    );
    let wrong = r
        .client
        .post(r.url("/generate"))
        .bearer_auth("gamma")
        .body("{}")
        .send()
        .await?;
    assert_eq!(wrong.status().as_u16(), 401);
    assert_eq!(a.requests(), 0);
    let ok = r
        .client
        .post(r.url("/generate"))
        .bearer_auth("beta")
        .body(r#"{"text":"x"}"#)
        .send()
        .await?;
    assert_eq!(ok.status().as_u16(), 200);
    let ok = r
        .client
        .post(r.url("/generate"))
        .header("x-api-key", "alpha")
        .body(r#"{"text":"x"}"#)
        .send()
        .await?;
    assert_eq!(ok.status().as_u16(), 200);
    for seen in a.seen() {
        assert!(
            seen.headers.get("authorization").is_none() && seen.headers.get("x-api-key").is_none()
        );
    }
    Ok(())
}

#[tokio::test]
async fn affinity_keeps_a_session_on_one_worker_and_spills_when_it_is_busy() -> Result<()> {
    let (a, b, c) = (mock().await?, mock().await?, mock().await?);
    let r = router_mw(&[mw(AFFINITY_ROUTER, "slack=1")], &[&a, &b, &c]).await?;
    let counts = || [a.requests(), b.requests(), c.requests()];
    let mut homes = HashMap::new();
    for session in ["s1", "s2", "s3", "s4", "s5", "s6"] {
        let before = counts();
        for _ in 0..5 {
            let response = r
                .client
                .post(r.url("/generate"))
                .header("x-session-id", session)
                .body(r#"{"text":"x"}"#)
                .send()
                .await?;
            assert_eq!(response.status().as_u16(), 200);
        }
        let after = counts();
        let grew: Vec<usize> = (0..3).filter(|&i| after[i] > before[i]).collect();
        assert_eq!(
            grew.len(),
            1,
            "session {session} stayed on one worker: {before:?} -> {after:?}"
        );
        assert_eq!(after[grew[0]] - before[grew[0]], 5);
        homes.insert(session, grew[0]);
    }
    let distinct: std::collections::HashSet<_> = homes.values().collect();
    assert!(
        distinct.len() > 1,
        "sessions hash to different workers: {homes:?}"
    );
    // Hold two slow requests on s1's home worker: the third spills elsewhere (slack 1).
    let home = homes["s1"];
    let slow = |r: &crate::common::TestRouter| {
        r.client
            .post(r.url("/generate"))
            .header("x-session-id", "s1")
            .header("x-mock-delay-ms", "400")
            .body(r#"{"text":"x"}"#)
            .send()
    };
    let before = counts();
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(tokio::spawn(slow(&r)));
        let in_flight = || a.in_flight() + b.in_flight() + c.in_flight();
        crate::common::eventually(2.0, async || Ok(in_flight() == i + 1)).await?;
    }
    for request in held {
        assert_eq!(request.await??.status().as_u16(), 200);
    }
    let after = counts();
    let spilled: usize = (0..3)
        .filter(|&i| i != home)
        .map(|i| after[i] - before[i])
        .sum();
    assert!(
        spilled >= 1,
        "a busy home worker spills: {before:?} -> {after:?}"
    );
    Ok(())
}
