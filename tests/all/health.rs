//! Health probes: DEAD after the failure threshold, back after the success threshold.

use anyhow::Result;
use serde_json::json;

use crate::common::{eventually, mock, router};

#[tokio::test]
async fn unhealthy_worker_leaves_routing_and_comes_back() -> Result<()> {
    let (a, b) = (mock().await?, mock().await?);
    let urls = vec![a.url(), b.url()];
    let r = router(|c| {
        c.worker_urls = urls;
        c.rollout_health_check_interval = 0.05;
        c.slime_router_health_check_failure_threshold = 2;
        c.health_check_success_threshold = 2;
    })
    .await?;
    // The same switch the mock-worker binary offers over HTTP.
    let client = reqwest::Client::new();
    client
        .post(format!("{}/mock/health?healthy=false", a.url()))
        .send()
        .await?;
    eventually(2.0, async || Ok(!r.workers().await?[0].2)).await?;
    let before = a.requests();
    for _ in 0..10 {
        assert_eq!(r.post("/generate", &json!({"text": "x"})).await?.0, 200);
    }
    // Only health probes reached the unhealthy worker.
    let generate_hits = a
        .seen()
        .iter()
        .skip(before)
        .filter(|s| s.path_and_query == "/generate")
        .count();
    assert_eq!(generate_hits, 0);
    client
        .post(format!("{}/mock/health?healthy=true", a.url()))
        .send()
        .await?;
    eventually(2.0, async || Ok(r.workers().await?[0].2)).await?;
    Ok(())
}

#[tokio::test]
async fn re_adding_a_dead_worker_probes_it_at_once() -> Result<()> {
    let mut a = mock().await?;
    let url = a.url();
    let r = router(|c| {
        c.worker_urls = vec![url.clone()];
        c.slime_router_health_check_failure_threshold = 1;
    })
    .await?;
    // Registration probes the worker once (/health, then /get_model_info); let that finish,
    // so that the request below is what finds it gone.
    eventually(2.0, async || Ok(a.probes() >= 2)).await?;
    a.kill();
    let (status, _) = r.post("/generate", &json!({"text": "x"})).await?;
    assert_eq!(status, 502, "the only worker is gone");
    assert!(
        !r.workers().await?[0].2,
        "a connect failure at threshold 1 makes it DEAD"
    );
    a.restart().await?;
    // The probe interval is an hour: only the re-registration can revive it quickly.
    r.post(&format!("/add_worker?url={url}"), &json!(null))
        .await?;
    eventually(2.0, async || Ok(r.workers().await?[0].2)).await?;
    assert_eq!(r.post("/generate", &json!({"text": "x"})).await?.0, 200);
    Ok(())
}
