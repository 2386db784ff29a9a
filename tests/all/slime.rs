//! The worker API exactly as today's slime drives it (slime/backends/sglang_utils/
//! sglang_engine.py): `POST /workers` then `raise_for_status()` at engine start, and at
//! shutdown `GET /workers`, the entry whose `url` equals the engine's, `DELETE /workers/{id}`
//! with that id pasted into the path as it is.

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use crate::common::{TestRouter, mock, router};

/// slime's `raise_for_status()`: every success is a 2xx.
async fn post_ok(r: &TestRouter, path: &str, body: &Value) -> Result<Value> {
    let request = r.client.post(r.url(path)).body(body.to_string());
    let response = request.send().await?.error_for_status()?;
    crate::common::parse(&response.bytes().await?)
}

/// What slime's engine does at shutdown.
async fn slime_remove(r: &TestRouter, url: &str) -> Result<u16> {
    let (_, listed) = r.get("/workers").await?;
    let entry = listed["workers"]
        .as_array()
        .context("workers list")?
        .iter()
        .find(|w| w["url"] == url)
        .context("the engine's entry")?;
    let id = entry["id"].as_str().context("an id")?;
    let response = r
        .client
        .delete(r.url(&format!("/workers/{id}")))
        .send()
        .await?;
    Ok(response.status().as_u16())
}

#[tokio::test]
async fn slime_registers_regular_prefill_and_decode_engines_and_removes_them_by_id() -> Result<()> {
    let (regular, prefill, decode) = (mock().await?, mock().await?, mock().await?);
    let r = router(|_| {}).await?;
    let answers = [
        post_ok(
            &r,
            "/workers",
            &json!({"url": regular.url(), "worker_type": "regular"}),
        )
        .await?,
        post_ok(
            &r,
            "/workers",
            &json!({"url": prefill.url(), "worker_type": "prefill", "bootstrap_port": 8998}),
        )
        .await?,
        post_ok(
            &r,
            "/workers",
            &json!({"url": decode.url(), "worker_type": "decode"}),
        )
        .await?,
    ];
    for (answer, (url, kind)) in answers.iter().zip([
        (regular.url(), "regular"),
        (prefill.url(), "prefill"),
        (decode.url(), "decode"),
    ]) {
        assert_eq!(answer["status"], "success", "{answer}");
        assert_eq!(
            (answer["url"].as_str(), answer["worker_type"].as_str()),
            (Some(&*url), Some(kind))
        );
        let id = answer["id"].as_str().context("id")?;
        assert!(!id.is_empty() && !id.contains(['/', '?', '#', '%']), "{id}");
    }
    let (_, listed) = r.get("/workers").await?;
    let workers = listed["workers"].as_array().context("workers")?;
    assert_eq!(workers.len(), 3);
    assert_eq!(workers[1]["bootstrap_port"], 8998);
    assert!(
        workers[0].get("bootstrap_port").is_none(),
        "only prefill entries carry it"
    );
    for (entry, answer) in workers.iter().zip(&answers) {
        assert_eq!(entry["id"], answer["id"]);
        assert_eq!(
            (
                entry["is_healthy"].as_bool(),
                entry["active_requests"].as_u64()
            ),
            (Some(true), Some(0))
        );
    }
    assert_eq!(
        listed["stats"],
        json!({"regular_count": 1, "prefill_count": 1, "decode_count": 1})
    );
    // GET /workers/{id} shows one.
    let id = answers[2]["id"].as_str().context("id")?;
    let (status, one) = r.get(&format!("/workers/{id}")).await?;
    assert_eq!((status, one["url"].as_str()), (200, Some(&*decode.url())));
    // Shutdown, engine by engine, the way slime does it.
    for url in [prefill.url(), regular.url(), decode.url()] {
        assert_eq!(slime_remove(&r, &url).await?, 200);
    }
    assert_eq!(r.get("/workers").await?.1["total"], 0);
    Ok(())
}

#[tokio::test]
async fn ids_are_stable_conflicts_are_409_and_unknown_ids_404() -> Result<()> {
    let a = mock().await?;
    let r = router(|_| {}).await?;
    let first = post_ok(
        &r,
        "/workers",
        &json!({"url": a.url(), "worker_type": "decode"}),
    )
    .await?;
    let again = post_ok(
        &r,
        "/workers",
        &json!({"url": format!("{}/", a.url()), "worker_type": "decode"}),
    )
    .await?;
    assert_eq!(
        first["id"], again["id"],
        "re-registering is a no-op with the same id"
    );
    let (status, body) = r
        .post(
            "/workers",
            &json!({"url": a.url(), "worker_type": "prefill"}),
        )
        .await?;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("decode")),
        "{body}"
    );
    for bad in [
        json!({"url": a.url(), "worker_type": "encoder"}),
        json!({"url": a.url(), "worker_type": "decode", "bootstrap_port": 1}),
        json!({"url": a.url(), "worker_type": "prefill", "bootstrap_port": "x"}),
        json!({"worker_type": "regular"}),
    ] {
        let (status, body) = r.post("/workers", &bad).await?;
        assert_eq!(status, 400, "{bad} -> {body}");
        assert!(body["error"].is_string());
    }
    for path in ["/workers/0123456789abcdef", "/workers/nope"] {
        let response = r.client.delete(r.url(path)).send().await?;
        assert_eq!(response.status().as_u16(), 404, "{path}");
        let body = crate::common::parse(&response.bytes().await?)?;
        assert!(body["error"].is_string());
        assert_eq!(r.get(path).await?.0, 404);
    }
    // Removed and registered again: the same url gets the same id.
    let id = first["id"].as_str().context("id")?;
    assert_eq!(
        r.client
            .delete(r.url(&format!("/workers/{id}")))
            .send()
            .await?
            .status()
            .as_u16(),
        200
    );
    let back = post_ok(&r, "/workers", &json!({"url": a.url()})).await?;
    assert_eq!(back["id"], first["id"]);
    assert_eq!(back["worker_type"], "regular");
    Ok(())
}

#[tokio::test]
async fn engine_metrics_merges_every_engine_labelled_by_worker() -> Result<()> {
    let (a, b) = (mock().await?, mock().await?);
    let mut dead = mock().await?;
    let r = crate::common::router_with(&[&a, &b, &dead]).await?;
    dead.kill();
    r.post("/generate", &json!({"text": "hi"})).await?;
    let response = r.client.get(r.url("/engine_metrics")).send().await?;
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text().await?;
    assert_eq!(
        text.matches("# TYPE sglang:num_running_reqs gauge").count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.matches("# HELP sglang:num_requests_total ").count(),
        1,
        "{text}"
    );
    for worker in [a.url(), b.url()] {
        let sample = format!(
            "sglang:num_running_reqs{{model_name=\"mock\",engine_type=\"unified\",tp_rank=\"0\",pp_rank=\"0\",worker=\"{worker}\"}} 0"
        );
        assert!(text.contains(&sample), "{sample} missing from\n{text}");
    }
    assert!(!text.contains(&dead.url()), "the dead engine is skipped");
    let total: f64 = text
        .lines()
        .filter(|l| l.starts_with("sglang:num_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(total, 1.0, "one generation across the engines:\n{text}");
    let metrics = r.client.get(r.url("/metrics")).send().await?.text().await?;
    let failed = format!(
        "slime_router_engine_metrics_failures_total{{worker=\"{}\"}} 1",
        dead.url()
    );
    assert!(metrics.contains(&failed), "{metrics}");
    Ok(())
}
