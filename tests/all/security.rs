//! The router must not become a proxy to the cloud metadata service or other link-local
//! hosts, and an encoded path must not slip past a middleware's path filter.

use anyhow::Result;
use guest_artifacts::API_KEY_AUTH;
use serde_json::json;

use crate::common::{mock, mw, router, router_mw};

#[tokio::test]
async fn metadata_and_link_local_hosts_are_refused() -> Result<()> {
    let r = router(|_| {}).await?;
    let (status, body) = r
        .post("/workers", &json!({"url": "http://169.254.169.254:80"}))
        .await?;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("--allow-worker-host"))
    );
    let (status, _) = r
        .post_raw("/add_worker?url=http://[fe80::1]:80", "")
        .await?;
    assert_eq!(status, 403);
    assert!(r.workers().await?.is_empty(), "nothing was registered");
    Ok(())
}

#[tokio::test]
async fn the_allow_list_admits_only_what_it_names() -> Result<()> {
    let a = mock().await?;
    let narrow = router(|c| c.allow_worker_host = vec!["127.0.0.2/32".into()]).await?;
    let (status, body) = narrow.post("/workers", &json!({"url": a.url()})).await?;
    assert_eq!(status, 403, "{body}");
    let wide =
        router(|c| c.allow_worker_host = vec!["127.0.0.0/8".into(), "169.254.169.254".into()])
            .await?;
    assert_eq!(
        wide.post("/workers", &json!({"url": a.url()})).await?.0,
        200
    );
    let named = json!({"url": "http://169.254.169.254:80"});
    assert_eq!(
        wide.post("/workers", &named).await?.0,
        200,
        "named explicitly"
    );
    Ok(())
}

#[tokio::test]
async fn a_metadata_address_at_startup_is_a_clear_error() -> Result<()> {
    let refused = router(|c| c.worker_urls = vec!["http://169.254.169.254:80".into()]).await;
    let error = refused.err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(error.contains("--allow-worker-host"), "{error}");
    Ok(())
}

#[tokio::test]
async fn encoded_paths_meet_the_filters_a_worker_would_route_on() -> Result<()> {
    let a = mock().await?;
    let guard = mw(API_KEY_AUTH, "keys=k1&paths=/generate");
    let r = router_mw(&[guard], &[&a]).await?;
    let (status, body) = r.post("/%67enerate", &json!({"text": "x"})).await?;
    assert_eq!(
        status, 401,
        "an encoded path slipped past the key check: {body}"
    );
    assert_eq!(a.requests(), 0);
    let keyed = r
        .client
        .post(r.url("/%67enerate"))
        .bearer_auth("k1")
        .body(r#"{"text":"x"}"#)
        .send()
        .await?;
    assert_eq!(keyed.status().as_u16(), 200);
    assert_eq!(
        a.last_seen().map(|s| s.path_and_query),
        Some("/generate".into())
    );
    for ambiguous in ["/gen%2Ferate", "/%FF", "/x%00"] {
        let (status, body) = r.post_raw(ambiguous, "{}").await?;
        assert_eq!(
            status,
            400,
            "{ambiguous}: {}",
            String::from_utf8_lossy(&body)
        );
        assert!(crate::common::parse(&body)?["error"].is_string());
    }
    let (status, listed) = r.get("/work%65rs").await?;
    assert_eq!(status, 200);
    assert!(
        listed["workers"].is_array(),
        "admin routes match decoded paths too"
    );
    Ok(())
}
