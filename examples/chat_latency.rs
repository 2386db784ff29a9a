//! What `/v1/chat/completions` through the chat-completions and radix-tree middleware adds
//! over `/generate` with `input_ids` (issue 13's benchmark), on a 10-turn conversation of
//! about 8k tokens, streamed and not.
//!
//! cargo run --release --example chat_latency -- [--rounds 200] [--turn-chars 3600]
//!
//! Nine turns go through the chat route first, so the cache holds the conversation as an RL
//! rollout would. Each round then sends a tenth turn with a new user message (its ~850
//! tokens are tokenised, the rest comes from the cache) through the chat route, and the exact
//! `input_ids` the worker got for it to `/generate` on a second router without middleware,
//! in the same round, streamed and not. Router, mock worker and client share this process
//! and its 2 threads, so compare the two routes with each other, not with a deployment.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use mock_worker::{MockConfig, MockWorker, load_tokenizer};
use serde_json::{Value, json};
use slime_router::{Config, RunningRouter};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    /// Characters of each user message (about 3 per token with the test tokenizer).
    #[arg(long, default_value_t = 3600)]
    turn_chars: usize,
}

const SENTENCES: &[&str] = &[
    "The quick brown fox jumps over the lazy dog. ",
    "Let me think step by step about the sum of 12 and 30. ",
    "Reinforcement learning from human feedback trains a policy with rewards over rollouts. ",
    "Search results: the tool returned three documents about foxes, dogs and their habitats. ",
];

fn user_text(turn: usize, variant: usize, chars: usize) -> String {
    let mut text = format!("Turn {turn}, variant {variant}: ");
    let mut i = turn + variant;
    while text.len() < chars {
        text.push_str(SENTENCES[i % SENTENCES.len()]);
        i += 1;
    }
    text
}

struct Bench {
    client: reqwest::Client,
    chat: String,
    plain: String,
}

impl Bench {
    async fn time(&self, url: &str, body: &Value) -> anyhow::Result<(Duration, Value)> {
        let started = Instant::now();
        let response = self.client.post(url).body(body.to_string()).send().await?;
        let status = response.status();
        let bytes = response.bytes().await?;
        let took = started.elapsed();
        anyhow::ensure!(
            status == 200,
            "{url}: {status} {}",
            String::from_utf8_lossy(&bytes)
        );
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((took, value))
    }
}

fn summary(mut times: Vec<Duration>) -> (f64, f64) {
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.9))
}

/// Seconds the cache spent in tokenizer calls (part of its hook time).
fn tokenizer_seconds(metrics: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with("slime_router_tokenizer_seconds_total{middleware=\"radix-tree\"}"))
        .and_then(|l| l.rsplit_once(' ')?.1.parse().ok())
        .unwrap_or(0.0)
}

/// Mean time per call of each middleware hook (and the tokenizer), from the router's
/// `_sum` and `_count` series, in microseconds.
fn hook_means(metrics: &str) -> Value {
    let series = |suffix: &str| -> Vec<(String, f64)> {
        metrics
            .lines()
            .filter(|l| l.starts_with("slime_router_middleware_") && !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                let (family, labels) = name.split_once('{')?;
                family.strip_suffix(suffix)?;
                Some((
                    format!("{family}{{{labels}").replace(suffix, ""),
                    value.parse().ok()?,
                ))
            })
            .collect()
    };
    let counts = series("_count");
    let means: serde_json::Map<String, Value> = series("_sum")
        .into_iter()
        .filter_map(|(key, sum)| {
            let count = counts.iter().find(|(k, _)| *k == key)?.1;
            (count > 0.0).then(|| (key, json!((sum / count * 1e7).round() / 10.0)))
        })
        .collect();
    Value::Object(means)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat-model");
    let tokenizer = load_tokenizer(&model.join("tokenizer.json"))?;
    let worker = MockWorker::start(MockConfig {
        tokenizer: Some(tokenizer.clone()),
        chat: true,
        record: true,
        ..MockConfig::default()
    })
    .await?;
    let mut config = Config::for_tests();
    config.rollout_health_check_interval = 3600.0;
    config.worker_urls = vec![worker.url()];
    let plain = RunningRouter::start(&config).await?;
    config.slime_router_middleware_paths = vec!["chat_completions".into(), "radix_tree".into()];
    config.hf_checkpoint = Some(model);
    let chat = RunningRouter::start(&config).await?;
    let bench = Bench {
        client: reqwest::Client::builder().no_proxy().build()?,
        chat: format!("http://{}/v1/chat/completions", chat.addr()),
        plain: format!("http://{}/generate", plain.addr()),
    };

    let mut history = vec![json!({"role": "system", "content": "You are a helpful assistant."})];
    for turn in 1..10 {
        history.push(json!({"role": "user", "content": user_text(turn, 0, args.turn_chars)}));
        let (_, answer) = bench
            .time(&bench.chat, &json!({"messages": history, "max_tokens": 64}))
            .await?;
        history.push(answer["choices"][0]["message"].clone());
    }
    let mut prompt_tokens = 0;
    let (mut chat_times, mut plain_times) = (Vec::new(), Vec::new());
    let (mut chat_stream, mut plain_stream) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        for stream in [false, true] {
            let mut messages = history.clone();
            let variant = 2 * round + usize::from(stream) + 1;
            messages
                .push(json!({"role": "user", "content": user_text(10, variant, args.turn_chars)}));
            let body = json!({"messages": messages, "max_tokens": 64, "stream": stream});
            let (took, _) = bench.time(&bench.chat, &body).await?;
            let seen = worker.last_seen().context("the worker saw nothing")?;
            let mut sent: Value = serde_json::from_slice(&seen.body)?;
            prompt_tokens = sent["input_ids"].as_array().map_or(0, Vec::len);
            sent["stream"] = json!(stream);
            let (plain_took, _) = bench.time(&bench.plain, &sent).await?;
            let (c, p) = if stream {
                (&mut chat_stream, &mut plain_stream)
            } else {
                (&mut chat_times, &mut plain_times)
            };
            c.push(took);
            p.push(plain_took);
        }
    }
    let row = |name: &str, chat: Vec<Duration>, plain: Vec<Duration>| {
        let ((c50, c90), (p50, p90)) = (summary(chat), summary(plain));
        json!({"mode": name, "chat_p50_ms": c50, "chat_p90_ms": c90, "generate_ids_p50_ms": p50,
               "generate_ids_p90_ms": p90, "added_p50_ms": c50 - p50})
    };
    let metrics = bench
        .client
        .get(format!("http://{}/metrics", chat.addr()))
        .send()
        .await?
        .text()
        .await?;
    let report = json!({
        "rounds": args.rounds,
        "prompt_tokens_turn_10": prompt_tokens,
        "mean_us_per_call": hook_means(&metrics),
        // Every chat request is tokenised by the cache: the nine history turns and 2 per round.
        "tokenizer_us_per_chat_request": tokenizer_seconds(&metrics) * 1e6 / (2 * args.rounds + 9) as f64,
        "results": [row("not streamed", chat_times, plain_times), row("streamed", chat_stream, plain_stream)],
    });
    println!("{report:#}");
    Ok(())
}
