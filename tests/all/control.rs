//! The RL loop's control calls through the router: abort by rid against fan-out, pause and
//! continue, weight updates fanned out with per-worker results, and version-aware routing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use mock_worker::{MockConfig, MockWorker};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

use crate::common::{TestRouter, eventually, metric, mock_with, router};

fn slow() -> MockConfig {
    MockConfig {
        tokens_per_second: 20.0,
        ..MockConfig::default()
    }
}

fn at_version(version: &str) -> MockConfig {
    MockConfig {
        weight_version: version.to_owned(),
        ..MockConfig::default()
    }
}

async fn router_for(
    workers: &[&MockWorker],
    tweak: impl FnOnce(&mut slime_router::Config),
) -> Result<TestRouter> {
    let urls: Vec<String> = workers.iter().map(|w| w.url()).collect();
    router(|c| {
        c.worker_urls = urls;
        tweak(c);
    })
    .await
}

/// The urls a control answer lists, in order.
fn urls(answer: &Value) -> Vec<String> {
    answer["results"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|e| e["url"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn generations(worker: &MockWorker) -> usize {
    worker
        .seen()
        .iter()
        .filter(|s| s.path_and_query == "/generate")
        .count()
}

fn aborts(worker: &MockWorker) -> usize {
    worker
        .seen()
        .iter()
        .filter(|s| s.path_and_query == "/abort_request")
        .count()
}

/// Starts a long stream with `rid` and returns it once its first event arrived.
async fn running_stream(r: &TestRouter, rid: &str) -> Result<reqwest::Response> {
    let body = json!({"text": "hi", "rid": rid, "stream": true,
                      "sampling_params": {"max_new_tokens": 400}});
    let mut response = r
        .client
        .post(r.url("/generate"))
        .body(body.to_string())
        .send()
        .await?;
    anyhow::ensure!(
        response.status() == 200,
        "stream answered {}",
        response.status()
    );
    response.chunk().await?.context("no first event")?;
    Ok(response)
}

async fn rest(mut response: reqwest::Response) -> Result<String> {
    let mut all = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        all.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&all).into_owned())
}

#[tokio::test]
async fn an_abort_by_rid_reaches_only_the_worker_running_it() -> Result<()> {
    let (a, b) = (mock_with(slow()).await?, mock_with(slow()).await?);
    let r = router_for(&[&a, &b], |_| {}).await?;
    let stream = running_stream(&r, "job-1").await?;
    let runner = if a.in_flight() == 1 { &a } else { &b };
    let (status, answer) = r.post("/abort_request", &json!({"rid": "job-1"})).await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(urls(&answer), [runner.url()], "only the runner is asked");
    let tail = rest(stream).await?;
    assert!(
        tail.contains(r#""type":"abort""#),
        "the stream ends aborted: {tail}"
    );
    assert_eq!(runner.aborted(), 1);
    assert_eq!(aborts(&a) + aborts(&b), 1, "no other worker got the abort");

    let (status, answer) = r.post("/abort_request", &json!({"rid": "unknown"})).await?;
    assert_eq!(status, 200);
    assert_eq!(urls(&answer).len(), 2, "an unknown rid fans out: {answer}");
    Ok(())
}

#[tokio::test]
async fn abort_all_fans_out_and_answers_after_every_worker() -> Result<()> {
    let (a, b) = (mock_with(slow()).await?, mock_with(slow()).await?);
    let r = router_for(&[&a, &b], |_| {}).await?;
    let first = running_stream(&r, "x").await?;
    let second = running_stream(&r, "y").await?;
    assert_eq!((a.in_flight(), b.in_flight()), (1, 1), "one stream on each");
    let (status, answer) = r
        .post("/abort_request", &json!({"abort_all": true}))
        .await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(urls(&answer), [a.url(), b.url()]);
    for entry in answer["results"].as_array().context("results")? {
        assert_eq!(entry["status"], 200);
        assert_eq!(entry["body"]["aborted"], 1, "{entry}");
    }
    for stream in [first, second] {
        assert!(rest(stream).await?.contains(r#""type":"abort""#));
    }
    Ok(())
}

/// A worker that reads what it is sent and never answers; counts the connections it took.
async fn never_answers() -> Result<(String, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let taken = Arc::new(AtomicUsize::new(0));
    let count = taken.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    Ok((url, taken))
}

#[tokio::test]
async fn fan_out_calls_report_a_worker_that_never_answers_as_timed_out() -> Result<()> {
    // No --slime-router-timeout: the control timeout alone bounds each worker's call.
    let a = mock_with(MockConfig::default()).await?;
    let (hung, taken) = never_answers().await?;
    let urls = vec![a.url(), hung.clone()];
    let r = router(|c| {
        c.worker_urls = urls;
        c.slime_router_timeout = None;
        c.control_timeout_secs = 0.5;
    })
    .await?;
    for (path, body) in [
        ("/flush_cache", json!({})),
        ("/abort_request", json!({"abort_all": true})),
        ("/pause_generation", json!({})),
    ] {
        let call = r.post(path, &body);
        // Without the bound the call never returns; 20 s only turns that hang into a failure.
        let (status, answer) = tokio::time::timeout(Duration::from_secs(20), call).await??;
        assert_eq!(status, 504, "{path}: {answer}");
        let results = answer["results"].as_array().context("results")?;
        let entry = |url: &str| results.iter().find(|e| e["url"] == url).cloned();
        assert_eq!(
            entry(&a.url()).context("live entry")?["status"],
            200,
            "{answer}"
        );
        let timed_out = entry(&hung).context("hung entry")?;
        assert_eq!(timed_out["status"], 504, "{answer}");
        let error = timed_out["error"].as_str().unwrap_or_default();
        assert!(error.contains("--control-timeout-secs"), "{answer}");
    }
    assert!(
        taken.load(Ordering::SeqCst) >= 3,
        "the hung worker got each call"
    );
    Ok(())
}

#[tokio::test]
async fn a_client_that_leaves_closes_its_upstream_connection() -> Result<()> {
    let a = mock_with(slow()).await?;
    let r = router_for(&[&a], |_| {}).await?;
    let stream = running_stream(&r, "leaving").await?;
    let open = a.open_connections();
    assert!(open >= 1);
    drop(stream);
    // SGLang aborts a request whose connection closes; the mock counts it the same way.
    eventually(5.0, async || {
        Ok(a.open_connections() < open && a.aborted() == 1)
    })
    .await?;
    r.assert_counts_return_to_zero().await
}

#[tokio::test]
async fn paused_workers_hold_requests_and_stay_healthy_until_continued() -> Result<()> {
    let (a, b) = (
        mock_with(MockConfig::default()).await?,
        mock_with(MockConfig::default()).await?,
    );
    let r = router_for(&[&a, &b], |c| {
        c.rollout_health_check_interval = 0.1;
        c.slime_router_health_check_failure_threshold = 1;
        c.slime_router_timeout = Some(0.3);
    })
    .await?;
    let (status, answer) = r.post("/pause_generation", &json!({})).await?;
    assert_eq!((status, urls(&answer).len()), (200, 2), "{answer}");
    assert!(a.is_paused() && b.is_paused());
    let (_, listed) = r.get("/workers").await?;
    assert!(
        listed["workers"]
            .as_array()
            .context("workers")?
            .iter()
            .all(|w| w["is_paused"] == true)
    );

    let body = json!({"text": "held", "sampling_params": {"max_new_tokens": 4}});
    let held = tokio::spawn({
        let (client, url) = (r.client.clone(), r.url("/generate"));
        async move {
            client
                .post(url)
                .body(body.to_string())
                .send()
                .await?
                .text()
                .await
        }
    });
    eventually(5.0, async || Ok(a.in_flight() + b.in_flight() >= 1)).await?;
    // Several probe rounds fail (a paused engine cannot generate) and the response timeout
    // passes; neither may fail the request or kill a worker.
    let probes = a.probes();
    eventually(5.0, async || Ok(a.probes() >= probes + 5)).await?;
    assert!(
        !held.is_finished(),
        "a held request was answered while paused"
    );
    assert!(
        r.workers().await?.iter().all(|(_, _, healthy)| *healthy),
        "paused workers marked dead"
    );

    let (status, _) = r.post("/continue_generation", &json!({})).await?;
    assert_eq!(status, 200);
    let text = tokio::time::timeout(Duration::from_secs(5), held).await???;
    assert!(text.contains("meta_info"), "held request: {text}");
    Ok(())
}

#[tokio::test]
async fn updates_fan_out_with_per_worker_results() -> Result<()> {
    let (a, b) = (
        mock_with(at_version("1")).await?,
        mock_with(at_version("1")).await?,
    );
    let r = router_for(&[&a, &b], |_| {}).await?;
    let versions = async || -> Result<Vec<Value>> {
        let (_, listed) = r.get("/workers").await?;
        let workers = listed["workers"].as_array().context("workers")?;
        Ok(workers
            .iter()
            .map(|w| w["weight_version"].clone())
            .collect())
    };
    eventually(5.0, async || {
        Ok(versions().await? == [json!("1"), json!("1")])
    })
    .await?;

    let update = json!({"model_path": "/ckpt/2", "weight_version": "2"});
    let (status, answer) = r.post("/update_weights_from_disk", &update).await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(urls(&answer), [a.url(), b.url()]);
    assert!(
        answer["results"]
            .as_array()
            .context("results")?
            .iter()
            .all(|e| e["body"]["success"] == true)
    );
    assert_eq!(
        (a.weight_version(), b.weight_version()),
        ("2".into(), "2".into())
    );
    assert_eq!(versions().await?, [json!("2"), json!("2")]);
    let scraped = r.client.get(r.url("/metrics")).send().await?.text().await?;
    let line = format!(
        "slime_router_worker_weight_version{{worker=\"{}\",weight_version=\"2\"}}",
        a.url()
    );
    assert_eq!(metric(&scraped, &line), Some(1.0), "{scraped}");

    let only_a = json!({"model_path": "/ckpt/3", "weight_version": "3", "worker_urls": [a.url()]});
    let (status, answer) = r.post("/update_weights_from_disk", &only_a).await?;
    assert_eq!((status, urls(&answer)), (200, vec![a.url()]), "{answer}");
    let forwarded: Value = serde_json::from_slice(&a.last_seen().context("seen")?.body)?;
    assert!(
        forwarded.get("worker_urls").is_none(),
        "worker_urls forwarded: {forwarded}"
    );
    assert_eq!(
        (a.weight_version(), b.weight_version()),
        ("3".into(), "2".into())
    );
    assert_eq!(versions().await?, [json!("3"), json!("2")]);

    let path = format!("/flush_cache?worker_urls={}", b.url());
    let (status, answer) = r.post(&path, &json!({})).await?;
    assert_eq!((status, urls(&answer)), (200, vec![b.url()]), "{answer}");
    assert_eq!(
        b.last_seen().context("seen")?.path_and_query,
        "/flush_cache"
    );
    Ok(())
}

#[tokio::test]
async fn control_calls_refuse_bad_input_and_run_one_at_a_time() -> Result<()> {
    let slow_answer = MockConfig {
        delay: Duration::from_millis(200),
        ..MockConfig::default()
    };
    let a = mock_with(slow_answer).await?;
    let r = router_for(&[&a], |_| {}).await?;
    let (status, body) = r.post_raw("/update_weights_from_disk", "{not json").await?;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let unknown = json!({"worker_urls": ["http://127.0.0.1:9"]});
    let (status, answer) = r.post("/flush_cache", &unknown).await?;
    assert_eq!(status, 404, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("127.0.0.1:9"))
    );

    eventually(5.0, async || Ok(a.probes() >= 2)).await?;
    let before = a.requests();
    let update = json!({"model_path": "/ckpt", "weight_version": "7"});
    let empty = json!({});
    let (first, second) = tokio::join!(
        r.post("/update_weights_from_disk", &update),
        r.post("/pause_generation", &empty)
    );
    assert_eq!((first?.0, second?.0), (200, 200));
    assert_eq!(a.requests(), before + 2);
    assert_eq!(
        a.max_in_flight(),
        1,
        "two control calls interleaved on a worker"
    );
    Ok(())
}

#[tokio::test]
async fn version_policies_choose_the_workers_recent_enough() -> Result<()> {
    let mocks = [
        mock_with(at_version("1")).await?,
        mock_with(at_version("2")).await?,
        mock_with(at_version("3")).await?,
    ];
    let workers: Vec<&MockWorker> = mocks.iter().collect();
    for (policy, allowed) in [
        ("any", [true, true, true]),
        ("max-staleness:1", [false, true, true]),
        ("latest", [false, false, true]),
    ] {
        let before: Vec<usize> = mocks.iter().map(generations).collect();
        let r = router_for(&workers, |c| {
            c.version_policy = slime_router::policy::version::VersionPolicy::parse(policy).unwrap()
        })
        .await?;
        eventually(5.0, async || {
            let (_, listed) = r.get("/workers").await?;
            Ok(listed["workers"]
                .as_array()
                .context("workers")?
                .iter()
                .all(|w| w["weight_version"].is_string()))
        })
        .await?;
        for _ in 0..30 {
            let (status, _) = r.post("/generate", &json!({"text": "v"})).await?;
            assert_eq!(status, 200);
        }
        let got: Vec<bool> = mocks
            .iter()
            .zip(&before)
            .map(|(m, b)| generations(m) > *b)
            .collect();
        assert_eq!(got, allowed, "{policy}");
    }
    Ok(())
}

/// A router with `--version-policy latest` whose only worker at the newest version (2) is
/// dead, leaving one at version 1.
async fn newest_dead(timeout: Option<f64>) -> Result<(MockWorker, MockWorker, TestRouter)> {
    let (old, new) = (
        mock_with(at_version("1")).await?,
        mock_with(at_version("2")).await?,
    );
    let r = router_for(&[&old, &new], |c| {
        c.version_policy = slime_router::policy::version::VersionPolicy::Within(0);
        c.rollout_health_check_interval = 0.1;
        c.slime_router_health_check_failure_threshold = 1;
        c.slime_router_timeout = timeout;
    })
    .await?;
    eventually(5.0, async || {
        let (_, listed) = r.get("/workers").await?;
        Ok(listed["workers"][1]["weight_version"] == "2")
    })
    .await?;
    new.set_healthy(false);
    eventually(5.0, async || {
        Ok(r.workers().await?.iter().any(|(_, _, healthy)| !healthy))
    })
    .await?;
    Ok((old, new, r))
}

#[tokio::test]
async fn a_request_waits_for_a_worker_at_the_newest_version() -> Result<()> {
    let (old, _new, r) = newest_dead(None).await?;
    let waiting = tokio::spawn({
        let (client, url) = (r.client.clone(), r.url("/generate"));
        async move {
            let response = client.post(url).body(r#"{"text":"w"}"#).send().await?;
            Ok::<u16, reqwest::Error>(response.status().as_u16())
        }
    });
    let probes = old.probes();
    eventually(5.0, async || Ok(old.probes() >= probes + 3)).await?;
    assert!(!waiting.is_finished(), "a request went to a stale worker");
    assert_eq!(generations(&old), 0);
    let update =
        json!({"model_path": "/ckpt/2", "weight_version": "2", "worker_urls": [old.url()]});
    assert_eq!(r.post("/update_weights_from_disk", &update).await?.0, 200);
    let status = tokio::time::timeout(Duration::from_secs(5), waiting).await???;
    assert_eq!((status, generations(&old)), (200, 1));
    Ok(())
}

#[tokio::test]
async fn a_request_that_waits_too_long_gets_503() -> Result<()> {
    let (old, _new, r) = newest_dead(Some(0.3)).await?;
    let (status, answer) = r.post("/generate", &json!({"text": "w"})).await?;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("--version-policy"))
    );
    assert_eq!(generations(&old), 0);
    Ok(())
}
