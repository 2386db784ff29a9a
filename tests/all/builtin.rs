//! Built-in middleware: names (and SlimeRouter's Python path) load the embedded components,
//! with no `.wasm` file on disk.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use serde_json::json;

use crate::common::{mock, router};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer.json")
}

/// The radix cache, named as old slime command lines name it, rewrites text into the
/// tokens the worker receives and serves its own route.
#[tokio::test]
async fn legacy_slime_path_runs_the_builtin_radix_cache() -> Result<()> {
    let worker = mock().await?;
    let url = worker.url();
    let router = router(|c| {
        c.worker_urls = vec![url];
        c.slime_router_middleware_paths =
            vec!["slime.router.middleware_hub.radix_tree_middleware:RadixTreeMiddleware".into()];
        c.hf_checkpoint = Some(fixture());
    })
    .await?;
    let (status, _) = router.post("/generate", &json!({"text": "Hello"})).await?;
    assert_eq!(status, 200);
    let sent = crate::common::parse(&worker.last_seen().context("worker saw nothing")?.body)?;
    assert!(sent["input_ids"].is_array(), "worker got {sent}");
    let (status, stats) = router.get("/radix_tree/stats").await?;
    assert_eq!(status, 200, "{stats}");
    Ok(())
}

/// A built-in name takes its config after `?` like a file does.
#[tokio::test]
async fn builtin_name_takes_a_config() -> Result<()> {
    let worker = mock().await?;
    let url = worker.url();
    let router = router(|c| {
        c.worker_urls = vec![url];
        c.slime_router_middleware_paths = vec!["api_key_auth?keys=s3cret".into()];
    })
    .await?;
    let (status, body) = router.get("/get_model_info").await?;
    assert_eq!(status, 401, "{body}");
    let response = router
        .client
        .get(router.url("/get_model_info"))
        .header("x-api-key", "s3cret")
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 200);
    Ok(())
}

/// An unknown name stops startup and says which names exist.
#[tokio::test]
async fn unknown_name_fails_startup_listing_the_builtins() -> Result<()> {
    let Err(error) = router(|c| c.slime_router_middleware_paths = vec!["radix".into()]).await
    else {
        anyhow::bail!("the router started with an unknown middleware");
    };
    let message = format!("{error:#}");
    assert!(message.contains("middleware radix"), "{message}");
    assert!(
        message.contains(
            "affinity_router, api_key_auth, chat_completions, noop, radix_tree, request_id"
        ),
        "{message}"
    );
    Ok(())
}
