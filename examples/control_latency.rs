//! Latency of the RL loop's control calls through the router, with 64 mock workers (issue
//! 11's benchmark): an abort by a rid the router knows (one worker asked) against one it does
//! not (fanned out to all), and a weight update fanned out to every worker against one sent
//! to a single worker with `worker_urls`.
//!
//! cargo run --release --example control_latency -- [--workers 64] [--rounds 100]
//!
//! Router and mocks share this process (and its 2 threads), so the figures include the
//! mocks' own work; compare them with each other, not with a real deployment.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use mock_worker::{MockConfig, MockWorker};
use serde_json::{Value, json};
use slime_router::{Config, RunningRouter};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 64)]
    workers: usize,
    #[arg(long, default_value_t = 100)]
    rounds: usize,
}

struct Bench {
    client: reqwest::Client,
    base: String,
}

impl Bench {
    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .body(body.to_string())
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        anyhow::ensure!(status == 200, "{path} answered {status}: {text}");
        Ok(started.elapsed())
    }

    /// A stream with `rid` running on some worker, once its first event arrived.
    async fn stream(&self, rid: &str) -> anyhow::Result<reqwest::Response> {
        let body = json!({"text": "x", "rid": rid, "stream": true,
                          "sampling_params": {"max_new_tokens": 1000}});
        let url = format!("{}/generate", self.base);
        let mut response = self.client.post(url).body(body.to_string()).send().await?;
        response.chunk().await?.context("no first event")?;
        Ok(response)
    }
}

fn summary(mut times: Vec<Duration>) -> Value {
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    json!({"p50_ms": (at(0.5) * 1000.0).round() / 1000.0, "p90_ms": (at(0.9) * 1000.0).round() / 1000.0})
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let paced = MockConfig {
        tokens_per_second: 50.0,
        ..MockConfig::default()
    };
    let mut mocks = Vec::new();
    for _ in 0..args.workers {
        mocks.push(MockWorker::start(paced.clone()).await?);
    }
    let mut config = Config::for_tests();
    config.rollout_health_check_interval = 3600.0;
    config.worker_urls = mocks.iter().map(MockWorker::url).collect();
    let router = RunningRouter::start(&config).await?;
    let bench = Bench {
        client: reqwest::Client::builder().no_proxy().build()?,
        base: format!("http://{}", router.addr()),
    };
    let (mut by_rid, mut fanned, mut update_all, mut update_one) = (vec![], vec![], vec![], vec![]);
    for round in 0..args.rounds {
        let rid = format!("bench-{round}");
        let stream = bench.stream(&rid).await?;
        by_rid.push(bench.post("/abort_request", &json!({"rid": rid})).await?);
        drop(stream.bytes().await?);
        let unknown = json!({"rid": format!("unknown-{round}")});
        fanned.push(bench.post("/abort_request", &unknown).await?);
        let update = json!({"model_path": "/ckpt", "weight_version": round.to_string()});
        update_all.push(bench.post("/update_weights_from_disk", &update).await?);
        let mut one = update.clone();
        one["worker_urls"] = json!([mocks[round % mocks.len()].url()]);
        update_one.push(bench.post("/update_weights_from_disk", &one).await?);
    }
    let report = json!({
        "workers": args.workers,
        "rounds": args.rounds,
        "abort_known_rid": summary(by_rid),
        "abort_fanned_out": summary(fanned),
        "update_all_workers": summary(update_all),
        "update_one_worker": summary(update_one),
    });
    println!("{report}");
    Ok(())
}
