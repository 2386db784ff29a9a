//! Shared test plumbing: start routers and mock workers, speak HTTP to them.

#![allow(dead_code)]

use std::time::Duration;

use anyhow::{Context as _, Result};
use mock_worker::{MockConfig, MockWorker};
use serde_json::Value;
use slime_router::{Config, RunningRouter};

pub struct TestRouter {
    pub router: RunningRouter,
    pub base: String,
    pub client: reqwest::Client,
}

/// A router with test-friendly defaults, adjusted by `tweak`.
pub async fn router(tweak: impl FnOnce(&mut Config)) -> Result<TestRouter> {
    let mut config = Config::for_tests();
    config.rollout_health_check_interval = 3600.0;
    tweak(&mut config);
    let router = RunningRouter::start(&config).await?;
    let base = format!("http://{}", router.addr());
    let client = reqwest::Client::builder().no_proxy().build()?;
    Ok(TestRouter {
        router,
        base,
        client,
    })
}

/// A router with these workers registered.
pub async fn router_with(workers: &[&MockWorker]) -> Result<TestRouter> {
    let urls: Vec<String> = workers.iter().map(|w| w.url()).collect();
    router(|c| c.worker_urls = urls).await
}

pub async fn mock() -> Result<MockWorker> {
    Ok(MockWorker::start(MockConfig {
        record: true,
        ..MockConfig::default()
    })
    .await?)
}

pub async fn mock_with(config: MockConfig) -> Result<MockWorker> {
    Ok(MockWorker::start(MockConfig {
        record: true,
        ..config
    })
    .await?)
}

impl TestRouter {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// POSTs raw bytes; returns status and body.
    pub async fn post_raw(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<(u16, bytes::Bytes)> {
        let response = self.client.post(self.url(path)).body(body).send().await?;
        Ok((response.status().as_u16(), response.bytes().await?))
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        let (status, bytes) = self.post_raw(path, body.to_string()).await?;
        Ok((status, parse(&bytes)?))
    }

    pub async fn get(&self, path: &str) -> Result<(u16, Value)> {
        let response = self.client.get(self.url(path)).send().await?;
        let status = response.status().as_u16();
        Ok((status, parse(&response.bytes().await?)?))
    }

    /// `GET /workers` as (url, active_requests, is_healthy).
    pub async fn workers(&self) -> Result<Vec<(String, u64, bool)>> {
        let (_, body) = self.get("/workers").await?;
        let workers = body["workers"].as_array().context("workers list")?;
        Ok(workers
            .iter()
            .map(|w| {
                let url = w["url"].as_str().unwrap_or_default().to_owned();
                (
                    url,
                    w["active_requests"].as_u64().unwrap_or(u64::MAX),
                    w["is_healthy"].as_bool().unwrap_or(false),
                )
            })
            .collect())
    }

    /// Waits until every worker's in-flight count is 0 (a guard released late shows here).
    pub async fn assert_counts_return_to_zero(&self) -> Result<()> {
        let mut last = Vec::new();
        for _ in 0..200 {
            last = self.workers().await?;
            if last.iter().all(|(_, n, _)| *n == 0) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::bail!("in-flight counts never returned to 0: {last:?}")
    }
}

pub fn parse(bytes: &[u8]) -> Result<Value> {
    serde_json::from_slice(bytes)
        .with_context(|| format!("not JSON: {}", String::from_utf8_lossy(bytes)))
}

/// Polls `check` until it holds, for up to `secs` seconds.
pub async fn eventually(secs: f64, mut check: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("condition not met within {secs}s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A router running `middleware` (path?config entries) in front of `workers`.
pub async fn router_mw(middleware: &[String], workers: &[&MockWorker]) -> Result<TestRouter> {
    let urls: Vec<String> = workers.iter().map(|w| w.url()).collect();
    let middleware = middleware.to_vec();
    router(|c| {
        c.worker_urls = urls;
        c.slime_router_middleware_paths = middleware;
    })
    .await
}

/// `path?config` for a guest component.
pub fn mw(path: &str, config: &str) -> String {
    if config.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{config}")
    }
}

/// The value of a counter or gauge line on /metrics, if present.
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Waits until nothing accepts connections at `addr` (a killed mock's listener is closed by
/// its aborted task, a moment after `kill`).
pub async fn wait_closed(addr: std::net::SocketAddr) -> Result<()> {
    eventually(2.0, async || {
        Ok(tokio::net::TcpStream::connect(addr).await.is_err())
    })
    .await
}

/// Starts the router binary with `args` (through `program`'s `pre` arguments when given, e.g.
/// a shell that lowers a limit first) and returns it with the address it listens on, read
/// from its log. The rest of its log is drained, so it never blocks on a full pipe.
pub async fn spawn_router(pre: &[&str], args: &[&str]) -> Result<(tokio::process::Child, String)> {
    use tokio::io::AsyncBufReadExt;
    let router = env!("CARGO_BIN_EXE_slime-router");
    let mut command = match pre.split_first() {
        Some((program, rest)) => {
            let mut c = tokio::process::Command::new(program);
            c.args(rest).arg(router);
            c
        }
        None => tokio::process::Command::new(router),
    };
    let mut child = command
        .args(["--sglang-router-port", "0", "--log-level", "info"])
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next_line()
            .await?
            .context("router exited before listening")?;
        if let Some(rest) = line.split("addr=").nth(1) {
            break rest.split_whitespace().next().context("addr")?.to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, addr))
}
