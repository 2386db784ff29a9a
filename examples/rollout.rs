//! A rollout client shaped like slime's, for the routing benchmark (bench/rollout.py):
//! G prompts x S samples x T turns, every sample concurrent. Each turn sends `input_ids` =
//! the previous turn's `input_ids` + its `output_ids` + a tool-output chunk, as multi-turn
//! agentic rollouts do; with `--key sample` (or `group`) every request carries
//! `X-SMG-Routing-Key`.
//!
//! cargo run --release --example rollout -- --router http://127.0.0.1:30000 \
//!     --workers http://127.0.0.1:31001 http://127.0.0.1:31002 [--key sample]
//!
//! Prints one JSON line: makespan, trajectory p50/p90, prefill tokens computed, cache hit
//! ratio (from the workers' `cached_tokens`), and the load imbalance across the workers
//! (max/mean of the requests each served, read from their `/metrics`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use serde_json::{Value, json};

#[derive(Parser, Clone)]
struct Args {
    /// The router (or a worker) to send to.
    #[arg(long)]
    router: String,
    /// The workers behind it, to read their request counts from /metrics.
    #[arg(long, num_args = 0..)]
    workers: Vec<String>,
    /// Prompts, each sampled `--samples` times (a GRPO group).
    #[arg(long, default_value_t = 64)]
    groups: usize,
    #[arg(long, default_value_t = 8)]
    samples: usize,
    #[arg(long, default_value_t = 4)]
    turns: usize,
    /// Tokens of each group's prompt.
    #[arg(long, default_value_t = 1024)]
    prompt_tokens: usize,
    /// Tokens of the tool output appended after each turn.
    #[arg(long, default_value_t = 128)]
    tool_tokens: usize,
    /// Output tokens per turn are drawn uniformly from [min, max].
    #[arg(long, default_value_t = 32)]
    min_output: usize,
    #[arg(long, default_value_t = 96)]
    max_output: usize,
    /// Session keys: none, one per sample, or one per group.
    #[arg(long, default_value = "none", value_parser = ["none", "sample", "group"])]
    key: String,
    /// Seed for prompts, tool outputs and lengths (the same for every router compared).
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

struct Trajectory {
    seconds: f64,
    prompt_tokens: u64,
    cached_tokens: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(args.groups * args.samples)
        .timeout(Duration::from_secs(3600))
        .build()?;
    let before = worker_requests(&client, &args.workers).await?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let shared = Arc::new(args.clone());
    for group in 0..args.groups {
        let prompt = random_ids(args.seed, group as u64, args.prompt_tokens);
        for sample in 0..args.samples {
            let (client, args, prompt) = (client.clone(), shared.clone(), prompt.clone());
            tasks.spawn(async move { trajectory(&client, &args, group, sample, prompt).await });
        }
    }
    let mut trajectories = Vec::new();
    while let Some(result) = tasks.join_next().await {
        trajectories.push(result??);
    }
    let makespan = started.elapsed().as_secs_f64();
    let after = worker_requests(&client, &args.workers).await?;
    let served: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let mean = served.iter().sum::<f64>() / served.len().max(1) as f64;
    let imbalance = served.iter().copied().fold(0.0, f64::max) / mean.max(1.0);
    let mut times: Vec<f64> = trajectories.iter().map(|t| t.seconds).collect();
    times.sort_by(f64::total_cmp);
    let prompt: u64 = trajectories.iter().map(|t| t.prompt_tokens).sum();
    let cached: u64 = trajectories.iter().map(|t| t.cached_tokens).sum();
    let report = json!({
        "makespan_s": makespan,
        "trajectory_p50_s": percentile(&times, 0.5),
        "trajectory_p90_s": percentile(&times, 0.9),
        "prefill_tokens": prompt - cached,
        "prompt_tokens": prompt,
        "cache_hit_ratio": cached as f64 / prompt.max(1) as f64,
        "load_imbalance": imbalance,
        "requests_per_worker": served,
    });
    println!("{report}");
    Ok(())
}

async fn trajectory(
    client: &reqwest::Client,
    args: &Args,
    group: usize,
    sample: usize,
    mut input: Vec<u32>,
) -> anyhow::Result<Trajectory> {
    let started = Instant::now();
    let stream = (args.seed << 32) ^ ((group as u64) << 16) ^ sample as u64;
    let key = match args.key.as_str() {
        "sample" => Some(format!("g{group}-s{sample}")),
        "group" => Some(format!("g{group}")),
        _ => None,
    };
    let (mut prompt_tokens, mut cached_tokens) = (0, 0);
    for turn in 0..args.turns {
        let span = args.max_output.saturating_sub(args.min_output) + 1;
        let output = args.min_output + (mix(stream, turn as u64) as usize) % span;
        let body = json!({
            "input_ids": input,
            "sampling_params": {"max_new_tokens": output, "temperature": 1.0},
            "return_logprob": false,
        });
        let mut request = client
            .post(format!("{}/generate", args.router))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(key) = &key {
            request = request.header("x-smg-routing-key", key);
        }
        let response = request.send().await?;
        let status = response.status();
        let bytes = response.bytes().await?;
        if !status.is_success() {
            bail!(
                "turn {turn} of g{group}-s{sample}: {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        let answer: Value = serde_json::from_slice(&bytes)?;
        let meta = &answer["meta_info"];
        prompt_tokens += meta["prompt_tokens"].as_u64().unwrap_or(input.len() as u64);
        cached_tokens += meta["cached_tokens"].as_u64().unwrap_or(0);
        let ids = answer["output_ids"].as_array().context("output_ids")?;
        input.extend(ids.iter().filter_map(|v| v.as_u64()).map(|v| v as u32));
        input.extend(random_ids(stream, 1000 + turn as u64, args.tool_tokens));
    }
    Ok(Trajectory {
        seconds: started.elapsed().as_secs_f64(),
        prompt_tokens,
        cached_tokens,
    })
}

/// Each worker's served request count (`sglang:num_requests_total` on its /metrics).
async fn worker_requests(client: &reqwest::Client, workers: &[String]) -> anyhow::Result<Vec<f64>> {
    let mut counts = Vec::new();
    for worker in workers {
        let text = client
            .get(format!("{worker}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let count = text
            .lines()
            .find(|l| l.starts_with("sglang:num_requests_total"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0);
        counts.push(count);
    }
    Ok(counts)
}

fn random_ids(seed: u64, stream: u64, n: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| 1000 + (mix(seed ^ stream.rotate_left(17), i) % 150_000) as u32)
        .collect()
}

/// splitmix64 of (a, b): deterministic pseudo-random numbers without a dependency.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(b)
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}
