//! Worker registration and the router's own endpoints, in SlimeRouter's JSON shapes.

use anyhow::Result;
use serde_json::json;

use crate::common::{eventually, mock, router, router_with};

#[tokio::test]
async fn add_worker_by_query_body_and_alias_without_duplicates() -> Result<()> {
    let (a, b, c) = (mock().await?, mock().await?, mock().await?);
    let r = router(|_| {}).await?;
    let (status, body) = r
        .post(&format!("/add_worker?url={}", a.url()), &json!(null))
        .await?;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"status": "success", "worker_urls": {a.url(): 0}})
    );
    let (status, _) = r
        .post(&format!("/add_worker?worker_url={}", b.url()), &json!(null))
        .await?;
    assert_eq!(status, 200);
    let (status, _) = r
        .post("/add_worker", &json!({"worker_url": c.url()}))
        .await?;
    assert_eq!(status, 200);
    // Re-adding (even spelled with a trailing slash) changes nothing.
    let (status, body) = r
        .post("/add_worker", &json!({"url": format!("{}/", a.url())}))
        .await?;
    assert_eq!(status, 200);
    assert_eq!(body["worker_urls"].as_object().map(|m| m.len()), Some(3));
    let (_, list) = r.get("/list_workers").await?;
    assert_eq!(
        list,
        json!({"urls": [a.url(), b.url(), c.url()]}),
        "registration order"
    );
    Ok(())
}

#[tokio::test]
async fn bad_admin_input_gets_4xx_json() -> Result<()> {
    let r = router(|_| {}).await?;
    let cases: [(&str, &str, u16); 7] = [
        ("/add_worker", "", 400),
        ("/add_worker", "{\"url\": ", 400),
        ("/add_worker", "[1,2]", 400),
        ("/add_worker", "{\"url\": \"localhost:8000\"}", 400),
        ("/add_worker", "{\"url\": \"http://h:1/v1\"}", 400),
        ("/add_worker?url=ftp://h:1", "", 400),
        ("/remove_worker?url=http://127.0.0.1:1", "", 404),
    ];
    for (path, body, want) in cases {
        let (status, bytes) = r.post_raw(path, body.to_owned()).await?;
        assert_eq!(status, want, "{path} {body}");
        let parsed = crate::common::parse(&bytes)?;
        assert!(
            parsed["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{path}: {parsed}"
        );
    }
    let response = r.client.get(r.url("/add_worker")).send().await?;
    assert_eq!(response.status().as_u16(), 405);
    Ok(())
}

#[tokio::test]
async fn remove_and_sglang_style_worker_api() -> Result<()> {
    let (a, b) = (mock().await?, mock().await?);
    let r = router(|_| {}).await?;
    let (status, body) = r
        .post(
            "/workers",
            &json!({"url": a.url(), "worker_type": "regular"}),
        )
        .await?;
    assert_eq!((status, body["status"].as_str()), (200, Some("success")));
    let (status, _) = r.post("/workers", &json!({"url": b.url()})).await?;
    assert_eq!(status, 200);
    let (status, _) = r
        .post(
            "/workers",
            &json!({"url": b.url(), "worker_type": "prefill"}),
        )
        .await?;
    // b is registered as regular: registering it again as prefill is a conflict.
    assert_eq!(status, 409);
    // Registration reads each worker's weight version at once (from /get_model_info).
    let mut workers = json!(null);
    eventually(5.0, async || {
        workers = r.get("/workers").await?.1;
        Ok(workers["workers"][1]["weight_version"].is_string())
    })
    .await?;
    let id = |w: &serde_json::Value| w["id"].as_str().unwrap_or_default().to_owned();
    let ids: Vec<String> = workers["workers"]
        .as_array()
        .map(|w| w.iter().map(id).collect())
        .unwrap_or_default();
    assert_eq!(
        workers,
        json!({"workers": [
            {"id": ids[0], "url": a.url(), "worker_type": "regular", "active_requests": 0, "load": 0, "is_healthy": true, "is_paused": false, "weight_version": "default"},
            {"id": ids[1], "url": b.url(), "worker_type": "regular", "active_requests": 0, "load": 0, "is_healthy": true, "is_paused": false, "weight_version": "default"},
        ], "total": 2, "stats": {"regular_count": 2, "prefill_count": 0, "decode_count": 0}})
    );
    let (status, body) = r
        .post(&format!("/remove_worker?url={}", a.url()), &json!(null))
        .await?;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"status": "success", "removed": a.url(), "worker_urls": [b.url()]})
    );
    let encoded = b.url().replace(':', "%3A").replace('/', "%2F");
    let response = r
        .client
        .delete(r.url(&format!("/workers/{encoded}")))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 200);
    let response = r
        .client
        .delete(r.url(&format!("/workers/{encoded}")))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 404);
    assert_eq!(r.get("/list_workers").await?.1, json!({"urls": []}));
    Ok(())
}

#[tokio::test]
async fn admin_key_guards_management_but_not_traffic() -> Result<()> {
    let a = mock().await?;
    let url = a.url();
    let r = router(|c| {
        c.admin_api_key = Some("s3cret".into());
        c.worker_urls = vec![url.clone()];
    })
    .await?;
    let response = r
        .client
        .post(r.url(&format!("/add_worker?url={url}")))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 401);
    assert!(crate::common::parse(&response.bytes().await?)?["error"].is_string());
    let wrong = r
        .client
        .get(r.url("/workers"))
        .bearer_auth("nope")
        .send()
        .await?;
    assert_eq!(wrong.status().as_u16(), 401);
    let ok = r
        .client
        .get(r.url("/workers"))
        .bearer_auth("s3cret")
        .send()
        .await?;
    assert_eq!(ok.status().as_u16(), 200);
    let listed = r.client.get(r.url("/list_workers")).send().await?;
    assert_eq!(
        listed.status().as_u16(),
        401,
        "the legacy listing is guarded too"
    );
    let lowercase = r
        .client
        .get(r.url("/list_workers"))
        .header("authorization", "bearer s3cret")
        .send()
        .await?;
    assert_eq!(
        lowercase.status().as_u16(),
        200,
        "the scheme is case-insensitive"
    );
    let (status, _) = r.post("/generate", &json!({"text": "hi"})).await?;
    assert_eq!(status, 200, "proxied traffic needs no admin key");
    Ok(())
}

#[tokio::test]
async fn metrics_expose_workers_and_latency() -> Result<()> {
    let a = mock().await?;
    let r = router_with(&[&a]).await?;
    for _ in 0..3 {
        r.post("/generate", &json!({"text": "hi"})).await?;
    }
    let text = r.client.get(r.url("/metrics")).send().await?.text().await?;
    let worker = format!("worker=\"{}\"", a.url());
    assert!(
        text.contains(&format!("slime_router_requests_total{{{worker}}} 3")),
        "{text}"
    );
    assert!(
        text.contains(&format!("slime_router_worker_in_flight{{{worker}}} 0")),
        "{text}"
    );
    assert!(
        text.contains(&format!("slime_router_worker_healthy{{{worker}}} 1")),
        "{text}"
    );
    assert!(
        text.contains("slime_router_request_duration_seconds_count 3"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn oversized_body_is_413_and_the_router_keeps_serving() -> Result<()> {
    let a = mock().await?;
    let url = a.url();
    let r = router(|c| {
        c.max_request_body_mib = 1;
        c.worker_urls = vec![url.clone()];
    })
    .await?;
    let (status, body) = r.post_raw("/generate", vec![b'x'; 2 << 20]).await?;
    assert_eq!(status, 413);
    assert!(
        crate::common::parse(&body)?["error"]
            .as_str()
            .is_some_and(|e| e.contains("limit"))
    );
    assert_eq!(a.requests(), 0, "nothing reached the worker");
    let (status, _) = r.post("/generate", &json!({"text": "hi"})).await?;
    assert_eq!(status, 200);
    Ok(())
}

#[tokio::test]
async fn oversized_chunked_body_is_413_too() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = mock().await?;
    let url = a.url();
    let r = router(|c| {
        c.max_request_body_mib = 1;
        c.worker_urls = vec![url.clone()];
    })
    .await?;
    let mut stream = tokio::net::TcpStream::connect(r.router.addr()).await?;
    let head = "POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    stream.write_all(head.as_bytes()).await?;
    let chunk = vec![b'x'; 64 << 10];
    for _ in 0..24 {
        stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await?;
        stream.write_all(&chunk).await?;
        stream.write_all(b"\r\n").await?;
    }
    stream.write_all(b"0\r\n\r\n").await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"error\""), "{answer}");
    assert_eq!(a.requests(), 0);
    Ok(())
}
