//! The middleware pipeline through the router: order, patches, replies, streams, routes,
//! routing hints and the sandbox.

use std::time::Duration;

use anyhow::{Context as _, Result};
use guest_artifacts::{HOSTILE, PROBE};
use mock_worker::MockConfig;
use serde_json::{Value, json};

use crate::common::{metric, mock, mock_with, mw, parse, router_mw};

#[tokio::test]
async fn request_hooks_run_in_order_and_response_hooks_in_reverse() -> Result<()> {
    let a = mock().await?;
    let r = router_mw(
        &[
            mw(PROBE, "name=first&tag=1"),
            mw(PROBE, "name=second&tag=1"),
        ],
        &[&a],
    )
    .await?;
    let response = r
        .client
        .post(r.url("/generate"))
        .header("x-pipeline", "client")
        .body(r#"{"text":"x"}"#)
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["x-pipeline-resp"], "second,first");
    let seen = a.last_seen().context("worker saw nothing")?;
    assert_eq!(seen.headers["x-pipeline"], "client,first,second");
    Ok(())
}

#[tokio::test]
async fn json_edits_keep_untouched_bytes_and_paths_can_change() -> Result<()> {
    let a = mock().await?;
    let r = router_mw(&[mw(PROBE, "json_edit=1&set_path=/echo?via=probe")], &[&a]).await?;
    let body = r#"{"p": 1e-7, "drop_me": 1, "text": "caf\u00e9"}"#;
    let response = r
        .client
        .post(r.url("/generate?orig=1"))
        .body(body)
        .send()
        .await?;
    assert_eq!(response.headers()["x-echo-path"], "/echo?via=probe");
    let sent = response.bytes().await?;
    assert_eq!(
        &sent[..],
        br#"{"p":1e-7,"text":"caf\u00e9","mw_seen":true,"probe_ids":[1,2,3]}"#
    );
    let (status, body) = r.post_raw("/generate", "[1, 2]").await?;
    assert_eq!(
        status, 400,
        "a JSON edit of a non-object body is the client's error"
    );
    assert!(parse(&body)?["error"].is_string());
    Ok(())
}

#[tokio::test]
async fn a_middleware_can_answer_and_the_worker_never_sees_it() -> Result<()> {
    let a = mock().await?;
    let r = router_mw(
        &[
            mw(PROBE, "respond=418&name=gate"),
            mw(PROBE, "name=later&counter=1"),
        ],
        &[&a],
    )
    .await?;
    let (status, body) = r.post("/generate", &json!({"text": "x"})).await?;
    assert_eq!((status, body), (418, json!({"from": "gate"})));
    assert_eq!(a.requests(), 0);
    let metrics = r.client.get(r.url("/metrics")).send().await?.text().await?;
    assert!(
        !metrics.contains("probe_calls"),
        "later middleware were not called"
    );
    Ok(())
}

#[tokio::test]
async fn response_body_edits_and_stash_reach_the_client() -> Result<()> {
    let a = mock().await?;
    let r = router_mw(&[mw(PROBE, "resp_json=1&stash=1&name=p1")], &[&a]).await?;
    let response = r
        .client
        .post(r.url("/generate?q=1"))
        .body(r#"{"text":"hi"}"#)
        .send()
        .await?;
    assert_eq!(response.headers()["x-stash"], "/generate?q=1");
    let length = response.content_length();
    let bytes = response.bytes().await?;
    assert_eq!(
        length,
        Some(bytes.len() as u64),
        "content-length matches the edited body"
    );
    let body = parse(&bytes)?;
    assert_eq!(body["probe_resp"], "p1");
    assert!(body["text"].is_string(), "the worker's fields are kept");
    Ok(())
}

#[tokio::test]
async fn chunk_hooks_see_whole_events_and_carry_state() -> Result<()> {
    let a = mock_with(MockConfig {
        tokens_per_second: 200.0,
        ..MockConfig::default()
    })
    .await?;
    let r = router_mw(&[mw(PROBE, "chunks=upper&name=up")], &[&a]).await?;
    let body = json!({"text": "hi", "stream": true, "sampling_params": {"max_new_tokens": 5}});
    let text = r
        .client
        .post(r.url("/generate"))
        .body(body.to_string())
        .send()
        .await?
        .text()
        .await?;
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(
        events.len(),
        7,
        "5 tokens, [DONE], then the summary: {text}"
    );
    assert!(
        events[..5]
            .iter()
            .all(|e| e.starts_with("DATA: {") && *e == e.to_ascii_uppercase()),
        "{text}"
    );
    assert_eq!(events[5], "DATA: [DONE]");
    let last: Value = serde_json::from_str(events[6].trim_start_matches("data: "))?;
    assert_eq!(last["probe_last"], "up");
    assert!(
        last["chunks"]
            .as_u64()
            .is_some_and(|n| (1..=6).contains(&n)),
        "{last}"
    );
    r.assert_counts_return_to_zero().await
}

#[tokio::test]
async fn middleware_routes_see_workers_and_keep_state() -> Result<()> {
    let a = mock().await?;
    let r = router_mw(&[mw(PROBE, "route=/probe/echo&stateful=1&name=svc")], &[&a]).await?;
    let (status, first) = r.post("/probe/echo", &json!({"k": "v"})).await?;
    assert_eq!(status, 200);
    assert_eq!(first["from"], "svc");
    assert_eq!(first["body_len"], 9);
    assert_eq!(
        first["workers"],
        json!([{"url": a.url(), "live": true, "in_flight": 0}])
    );
    let (_, second) = r.post("/probe/echo", &json!({})).await?;
    assert!(
        second["calls"].as_u64() > first["calls"].as_u64(),
        "one long-lived instance"
    );
    assert_eq!(a.requests(), 0, "a middleware route never reaches a worker");
    Ok(())
}

#[tokio::test]
async fn routing_hints_steer_and_dead_pins_fall_back() -> Result<()> {
    let (mut a, b, c) = (mock().await?, mock().await?, mock().await?);
    let r = router_mw(&[mw(PROBE, "hint_header=1")], &[&a, &b, &c]).await?;
    for _ in 0..6 {
        let response = r
            .client
            .post(r.url("/generate"))
            .header("x-route-to", b.url())
            .body("{\"text\":\"x\"}")
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 200);
    }
    assert_eq!((a.requests(), b.requests(), c.requests()), (0, 6, 0));
    a.kill();
    for _ in 0..6 {
        let response = r
            .client
            .post(r.url("/generate"))
            .header("x-route-to", a.url())
            .body("{\"text\":\"x\"}")
            .send()
            .await?;
        assert_eq!(
            response.status().as_u16(),
            200,
            "a pin to a dead worker is ignored safely"
        );
    }
    assert_eq!(b.requests() + c.requests(), 12);
    Ok(())
}

#[tokio::test]
async fn guest_metrics_and_logs_reach_the_router() -> Result<()> {
    let a = mock().await?;
    let r = router_mw(&[mw(PROBE, "counter=1&log=1&name=m")], &[&a]).await?;
    for _ in 0..3 {
        r.post("/generate", &json!({"text": "x"})).await?;
    }
    let text = r.client.get(r.url("/metrics")).send().await?.text().await?;
    let calls = metric(
        &text,
        "slime_router_middleware_counter_total{middleware=\"m\",name=\"probe_calls\"}",
    );
    assert_eq!(calls, Some(3.0), "{text}");
    assert_eq!(
        metric(
            &text,
            "slime_router_middleware_gauge{middleware=\"m\",name=\"probe_gauge\"}"
        ),
        Some(7.0)
    );
    let hook =
        "slime_router_middleware_hook_duration_seconds_count{middleware=\"m\",hook=\"on-request\"}";
    assert_eq!(
        metric(&text, hook),
        Some(3.0),
        "every on-request call is timed: {text}"
    );
    Ok(())
}

/// After a hostile call the router must still serve the next request correctly.
async fn still_serves(r: &crate::common::TestRouter) -> Result<()> {
    let (status, body) = r.post("/generate", &json!({"text": "after"})).await?;
    assert_eq!(status, 200, "{body}");
    assert!(body["text"].is_string());
    Ok(())
}

#[tokio::test]
async fn hostile_guests_fail_only_their_request() -> Result<()> {
    let a = mock().await?;
    // Each limit alone: the memory bomb gets a generous deadline so the cap stops it first.
    for (mode, kind, deadline_ms) in [
        ("loop", "deadline", 5.0),
        ("membomb", "memory", 5000.0),
        ("trap", "trap", 5.0),
    ] {
        let (url, spec) = (a.url(), mw(HOSTILE, &format!("mode={mode}&at=handle")));
        let r = crate::common::router(|c| {
            c.worker_urls = vec![url];
            c.slime_router_middleware_paths = vec![spec];
            c.middleware_deadline_ms = deadline_ms;
            c.middleware_memory_mib = 32;
        })
        .await?;
        let started = std::time::Instant::now();
        let response = r.client.get(r.url("/hostile/sandbox")).send().await?;
        assert_eq!(response.status().as_u16(), 500, "{mode}");
        let body = parse(&response.bytes().await?)?;
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("middleware hostile failed")),
            "{mode}: {body}"
        );
        assert!(started.elapsed().as_secs() < 5, "{mode} stopped promptly");
        still_serves(&r).await?;
        // The rebuilt instance serves its route again (and fails again, the same way).
        assert_eq!(
            r.client
                .get(r.url("/hostile/sandbox"))
                .send()
                .await?
                .status()
                .as_u16(),
            500
        );
        let text = r.client.get(r.url("/metrics")).send().await?.text().await?;
        let name = format!(
            "slime_router_middleware_failures_total{{middleware=\"hostile\",kind=\"{kind}\"}}"
        );
        let failures: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("slime_router_middleware_failures_total"))
            .collect();
        assert_eq!(metric(&text, &name), Some(2.0), "{mode}: {failures:?}");
    }
    Ok(())
}

#[tokio::test]
async fn hostile_request_hooks_fail_closed_or_open() -> Result<()> {
    let a = mock().await?;
    let closed = router_mw(&[mw(HOSTILE, "mode=loop&at=request")], &[&a]).await?;
    let (status, body) = closed.post("/generate", &json!({"text": "x"})).await?;
    assert_eq!(status, 500);
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("hostile")),
        "{body}"
    );
    let open = router_mw(&[mw(HOSTILE, "mode=trap&at=request&fail=open")], &[&a]).await?;
    still_serves(&open).await?;
    still_serves(&open).await?;
    Ok(())
}

#[tokio::test]
async fn the_sandbox_grants_no_files_env_args_or_sockets() -> Result<()> {
    let a = mock().await?;
    let r = router_mw(&[mw(HOSTILE, "mode=sandbox&at=handle")], &[&a]).await?;
    let response = r.client.get(r.url("/hostile/sandbox")).send().await?;
    assert_eq!(response.status().as_u16(), 200);
    let report = parse(&response.bytes().await?)?;
    assert!(
        report["file"]
            .as_str()
            .is_some_and(|s| s.starts_with("err")),
        "{report}"
    );
    assert!(
        report["dir"].as_str().is_some_and(|s| s.starts_with("err")),
        "{report}"
    );
    assert_eq!(
        (report["env"].as_u64(), report["args"].as_u64()),
        (Some(0), Some(0)),
        "{report}"
    );
    assert!(
        report["tcp"].as_str().is_some_and(|s| !s.starts_with("ok")),
        "{report}"
    );
    still_serves(&r).await
}

#[tokio::test]
async fn the_deadline_fires_after_the_router_sat_idle() -> Result<()> {
    // With no guest call running the epoch ticker parks (after 100 ticks, 250 ms at a 5 ms
    // deadline); the next call must wake it, or a runaway guest would never be stopped.
    let a = mock().await?;
    let r = router_mw(&[mw(HOSTILE, "mode=loop&at=handle")], &[&a]).await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let request = r.client.get(r.url("/hostile/sandbox")).send();
    let response = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .map_err(|_| anyhow::anyhow!("the looping guest was never interrupted"))??;
    assert_eq!(response.status().as_u16(), 500);
    still_serves(&r).await?;
    Ok(())
}

#[tokio::test]
async fn the_deadline_stops_long_guest_work_only() -> Result<()> {
    // `slow` spins in guest code (reading the host clock) for `ms` milliseconds.
    let a = mock().await?;
    let r = router_mw(&[mw(HOSTILE, "mode=slow&ms=200&at=handle")], &[&a]).await?;
    assert_eq!(
        r.client
            .get(r.url("/hostile/sandbox"))
            .send()
            .await?
            .status()
            .as_u16(),
        500
    );
    let quick = router_mw(&[mw(HOSTILE, "mode=slow&ms=1&at=handle")], &[&a]).await?;
    assert_ne!(
        quick
            .client
            .get(quick.url("/hostile/sandbox"))
            .send()
            .await?
            .status()
            .as_u16(),
        500
    );
    Ok(())
}

#[tokio::test]
async fn a_guest_that_sleeps_fails_its_call_instead_of_escaping_the_deadline() -> Result<()> {
    // Sleeping suspends the call without spending CPU time, which is what the deadline
    // counts: blocking on the clock must fail at once, not hold the call (and a stateful
    // guest's lock) for the whole sleep.
    let a = mock().await?;
    let r = router_mw(&[mw(HOSTILE, "mode=sleep&ms=30000&at=request")], &[&a]).await?;
    let body = json!({"text": "x"});
    let request = r.post("/generate", &body);
    let (status, body) = tokio::time::timeout(Duration::from_secs(20), request)
        .await
        .map_err(|_| anyhow::anyhow!("the sleeping guest held the request"))??;
    assert_eq!(status, 500);
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("hostile") && error.contains("may not sleep"),
        "{body}"
    );
    assert_eq!(a.requests(), 0);
    // The rebuilt instance fails the same way; the router is not stuck behind it.
    let (status, _) = r.post("/generate", &json!({"text": "x"})).await?;
    assert_eq!(status, 500);
    Ok(())
}
