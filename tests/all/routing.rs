//! Session keys and prefix-aware placement (issue: session-aware and prefix-aware routing):
//! keys stick to their worker, spread, spill under a burst, re-pin when their worker dies or
//! is removed, expire; cache_aware places a shared prompt where it went before, within the
//! load bound; a middleware's hint wins over both.

use std::time::Duration;

use anyhow::{Context as _, Result};
use guest_artifacts::AFFINITY_ROUTER;
use mock_worker::MockWorker;
use serde_json::json;

use crate::common::{TestRouter, eventually, metric, mock, mw, router, wait_closed};

async fn mocks(n: usize) -> Result<Vec<MockWorker>> {
    let mut workers = Vec::new();
    for _ in 0..n {
        workers.push(mock().await?);
    }
    Ok(workers)
}

async fn keyed_router(
    workers: &[MockWorker],
    tweak: impl FnOnce(&mut slime_router::Config),
) -> Result<TestRouter> {
    let urls: Vec<String> = workers.iter().map(MockWorker::url).collect();
    router(|c| {
        c.worker_urls = urls;
        tweak(c);
    })
    .await
}

/// Sends one /generate with these headers; returns the index of the worker that served it.
async fn send(
    r: &TestRouter,
    workers: &[MockWorker],
    headers: &[(&str, &str)],
    body: &str,
) -> Result<usize> {
    let before: Vec<usize> = workers.iter().map(MockWorker::requests).collect();
    let mut request = r.client.post(r.url("/generate")).body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    anyhow::ensure!(status == 200, "{status}: {text}");
    let served = workers
        .iter()
        .zip(&before)
        .position(|(w, b)| w.requests() > *b)
        .context("no worker served it")?;
    Ok(served)
}

async fn metrics(r: &TestRouter) -> Result<String> {
    Ok(r.client.get(r.url("/metrics")).send().await?.text().await?)
}

const BODY: &str = r#"{"text":"hi","sampling_params":{"max_new_tokens":2}}"#;

#[tokio::test]
async fn a_key_sticks_to_its_worker_and_many_keys_spread() -> Result<()> {
    let workers = mocks(4).await?;
    let r = keyed_router(&workers, |_| {}).await?;
    for key in ["a", "b", "c"] {
        let first = send(&r, &workers, &[("x-smg-routing-key", key)], BODY).await?;
        for _ in 0..10 {
            assert_eq!(
                send(&r, &workers, &[("x-smg-routing-key", key)], BODY).await?,
                first,
                "key {key}"
            );
        }
    }
    // X-Session-ID is a key too; 40 keys land on every worker.
    let mut homes = std::collections::HashSet::new();
    for i in 0..40 {
        homes.insert(send(&r, &workers, &[("x-session-id", &format!("k{i}"))], BODY).await?);
    }
    assert_eq!(homes.len(), 4, "keys spread over the workers: {homes:?}");
    let text = metrics(&r).await?;
    assert_eq!(
        metric(&text, "slime_router_session_hits_total"),
        Some(30.0),
        "{text}"
    );
    assert_eq!(metric(&text, "slime_router_session_new_total"), Some(43.0));
    let pinned: f64 = text
        .lines()
        .filter(|l| l.starts_with("slime_router_sessions{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(pinned, 43.0, "pinned sessions per worker add up: {text}");
    Ok(())
}

#[tokio::test]
async fn a_burst_on_one_key_spills_past_the_load_bound() -> Result<()> {
    let workers = mocks(2).await?;
    let r = keyed_router(&workers, |c| {
        c.balance_abs_threshold = 1;
        c.balance_rel_threshold = 1.0;
    })
    .await?;
    let home = send(&r, &workers, &[("x-smg-routing-key", "hot")], BODY).await?;
    // Hold two slow requests on the key's worker: the third exceeds the bound and moves.
    let mut held = Vec::new();
    for i in 0..2 {
        let request = r
            .client
            .post(r.url("/generate"))
            .header("x-smg-routing-key", "hot")
            .header("x-mock-delay-ms", "800")
            .body(BODY);
        held.push(tokio::spawn(request.send()));
        eventually(2.0, async || Ok(workers[home].in_flight() == i + 1)).await?;
    }
    let moved = send(&r, &workers, &[("x-smg-routing-key", "hot")], BODY).await?;
    assert_ne!(moved, home, "a key over the load bound spills");
    // It is re-pinned where it moved.
    assert_eq!(
        send(&r, &workers, &[("x-smg-routing-key", "hot")], BODY).await?,
        moved
    );
    for request in held {
        assert_eq!(request.await??.status().as_u16(), 200);
    }
    let text = metrics(&r).await?;
    assert_eq!(
        metric(
            &text,
            "slime_router_session_moves_total{cause=\"overload\"}"
        ),
        Some(1.0),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn a_key_re_pins_when_its_worker_dies_or_is_removed() -> Result<()> {
    let mut workers = mocks(3).await?;
    let r = keyed_router(&workers, |c| {
        c.slime_router_health_check_failure_threshold = 1
    })
    .await?;
    let key = [("x-smg-routing-key", "k")];
    let home = send(&r, &workers, &key, BODY).await?;
    workers[home].kill();
    wait_closed(workers[home].addr()).await?;
    // The dead worker's request moves: no failure, a new pin.
    let next = send(&r, &workers, &key, BODY).await?;
    assert_ne!(next, home);
    for _ in 0..5 {
        assert_eq!(
            send(&r, &workers, &key, BODY).await?,
            next,
            "re-pinned to its new worker"
        );
    }
    let text = metrics(&r).await?;
    assert_eq!(
        metric(&text, "slime_router_session_moves_total{cause=\"dead\"}"),
        Some(1.0),
        "{text}"
    );
    // Removing the new worker moves the key again.
    let url = workers[next].url();
    let (status, _) = r
        .post(&format!("/remove_worker?url={url}"), &json!(null))
        .await?;
    assert_eq!(status, 200);
    let last = send(&r, &workers, &key, BODY).await?;
    assert!(last != next && last != home);
    let text = metrics(&r).await?;
    assert_eq!(
        metric(&text, "slime_router_session_moves_total{cause=\"removed\"}"),
        Some(1.0),
        "{text}"
    );
    // /finish_session drops the pin.
    let (status, body) = r.post("/finish_session", &json!({"key": "k"})).await?;
    assert_eq!(
        (status, body["finished"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    let (_, body) = r.post("/finish_session", &json!({"key": "k"})).await?;
    assert_eq!(body["finished"], false);
    assert_eq!(r.post("/finish_session", &json!({})).await?.0, 400);
    Ok(())
}

#[tokio::test]
async fn an_idle_key_expires() -> Result<()> {
    let workers = mocks(2).await?;
    let r = keyed_router(&workers, |c| c.session_idle_secs = 0.2).await?;
    send(&r, &workers, &[("x-smg-routing-key", "old")], BODY).await?;
    // Idle time passing is the condition under test; the next keyed request sweeps the pin.
    tokio::time::sleep(Duration::from_millis(300)).await;
    send(&r, &workers, &[("x-smg-routing-key", "other")], BODY).await?;
    let text = metrics(&r).await?;
    assert_eq!(
        metric(&text, "slime_router_session_moves_total{cause=\"expired\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "slime_router_session_hits_total"),
        Some(0.0),
        "no request reused the pin"
    );
    Ok(())
}

fn ids_body(n: usize, extra: &[u32]) -> String {
    let mut ids: Vec<u32> = (0..n as u32).map(|i| 1000 + i).collect();
    ids.extend_from_slice(extra);
    json!({"input_ids": ids, "sampling_params": {"max_new_tokens": 2}}).to_string()
}

#[tokio::test]
async fn cache_aware_places_a_shared_prompt_where_it_went_within_the_load_bound() -> Result<()> {
    let workers = mocks(4).await?;
    let r = keyed_router(&workers, |c| {
        c.policy = "cache_aware".into();
        c.balance_abs_threshold = 1;
        c.balance_rel_threshold = 1.0;
    })
    .await?;
    let home = send(&r, &workers, &[], &ids_body(256, &[])).await?;
    // Samples of one prompt, and later turns that extend it, go to the same worker.
    for turn in 0..6u32 {
        let body = ids_body(256, &[7, turn, 8, 9]);
        assert_eq!(send(&r, &workers, &[], &body).await?, home, "turn {turn}");
    }
    // An unrelated prompt is placed by load.
    let mut elsewhere = std::collections::HashSet::new();
    for i in 0..12u32 {
        let other: Vec<u32> = (0..64).map(|j| 50_000 + i * 100 + j).collect();
        elsewhere.insert(send(&r, &workers, &[], &json!({"input_ids": other}).to_string()).await?);
    }
    assert!(elsewhere.len() > 1, "new prompts spread: {elsewhere:?}");
    // The load bound: with two slow requests held on the home worker, the prompt goes elsewhere.
    let mut held = Vec::new();
    for i in 0..2 {
        let request = r
            .client
            .post(r.url("/generate"))
            .header("x-mock-delay-ms", "800")
            .body(ids_body(256, &[1]));
        held.push(tokio::spawn(request.send()));
        eventually(2.0, async || Ok(workers[home].in_flight() == i + 1)).await?;
    }
    assert_ne!(
        send(&r, &workers, &[], &ids_body(256, &[2])).await?,
        home,
        "the bound wins over the prefix"
    );
    for request in held {
        assert_eq!(request.await??.status().as_u16(), 200);
    }
    let text = metrics(&r).await?;
    let matched = metric(&text, "slime_router_prefix_match_tokens_count").context("histogram")?;
    assert!(matched >= 20.0, "{text}");
    assert!(
        metric(&text, "slime_router_prefix_index_bytes").is_some_and(|b| b > 0.0),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn a_middleware_hint_wins_over_the_session_key() -> Result<()> {
    let workers = mocks(3).await?;
    let urls: Vec<String> = workers.iter().map(MockWorker::url).collect();
    let spec = mw(AFFINITY_ROUTER, "header=x-hint&slack=100");
    let r = router(|c| {
        c.worker_urls = urls;
        c.slime_router_middleware_paths = vec![spec];
    })
    .await?;
    // Where the hint sends "h" (the same whatever the key)...
    let hinted = send(&r, &workers, &[("x-hint", "h")], BODY).await?;
    // ...and a key pinned somewhere else.
    let mut key = 0;
    let pinned = loop {
        let name = format!("key{key}");
        let at = send(&r, &workers, &[("x-smg-routing-key", &name)], BODY).await?;
        if at != hinted {
            break name;
        }
        key += 1;
    };
    let both = [("x-smg-routing-key", pinned.as_str()), ("x-hint", "h")];
    for _ in 0..5 {
        assert_eq!(
            send(&r, &workers, &both, BODY).await?,
            hinted,
            "the hint wins"
        );
    }
    let pin = send(
        &r,
        &workers,
        &[("x-smg-routing-key", pinned.as_str())],
        BODY,
    )
    .await?;
    assert_ne!(pin, hinted, "and the pin is untouched");
    Ok(())
}
