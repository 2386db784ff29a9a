//! Registering workers without an admin key: the router must not become a proxy to the
//! cloud metadata service or other link-local hosts.

use anyhow::Result;
use serde_json::json;

use crate::common::{mock, router};

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
