//! A mock SGLang worker: `mock-worker --port 31001` (see the `mock_worker` library).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use mock_worker::{KvModel, MockConfig, MockWorker, Role, load_tokenizer};

#[derive(Parser)]
#[command(
    name = "mock-worker",
    about = "A mock SGLang worker for tests, demos and benchmarks"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free port; the URL is printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Fraction of /generate requests answered with 500.
    #[arg(long, default_value_t = 0.0)]
    failure_rate: f64,
    /// Pace of generated tokens (0 = instant).
    #[arg(long, default_value_t = 0.0)]
    tokens_per_second: f64,
    /// meta_info.weight_version to report.
    #[arg(long, default_value = "default")]
    weight_version: String,
    /// tokenizer.json (or a directory holding it); without one a token is a byte.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Size of a base64-like meta_info.routed_experts in every answer (0: none).
    #[arg(long, default_value_t = 0)]
    routed_experts_bytes: usize,
    /// regular, prefill (answers after --delay-ms with no output) or decode (echoes the
    /// bootstrap fields); prefill and decode refuse requests without bootstrap fields.
    #[arg(long, default_value = "regular", value_parser = ["regular", "prefill", "decode"])]
    role: String,
    /// Stream incremental events (only the new text, ids and logprobs), as SGLang does with
    /// --incremental-streaming-output.
    #[arg(long)]
    incremental_streaming: bool,
    /// Reply to the conversation in a ChatML prompt, ending with <|im_end|> (needs
    /// --tokenizer): for /v1/chat/completions through the chat-completions middleware.
    #[arg(long)]
    chat: bool,
    /// Simulate a prefix KV cache of this many tokens and a batching scheduler, in
    /// simulated time (the --prefill-us-per-token, --decode-ms-per-step, --max-running and
    /// --max-prefill-tokens knobs apply); 0 is off.
    #[arg(long, default_value_t = 0)]
    kv_capacity_tokens: usize,
    /// Prefill time per uncached prompt token, in microseconds (with --kv-capacity-tokens).
    #[arg(long, default_value_t = 50.0)]
    prefill_us_per_token: f64,
    /// Time of one decode step for all running requests, in milliseconds...
    #[arg(long, default_value_t = 10.0)]
    decode_ms_per_step: f64,
    /// ...plus this much per running request.
    #[arg(long, default_value_t = 0.1)]
    decode_ms_per_request: f64,
    /// Requests running at once; more queue.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// Uncached tokens one prefill batch may take (a longer prompt runs alone).
    #[arg(long, default_value_t = 16384)]
    max_prefill_tokens: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tokenizer = args.tokenizer.as_deref().map(load_tokenizer).transpose()?;
    let config = MockConfig {
        delay: Duration::from_millis(args.delay_ms),
        failure_rate: args.failure_rate,
        tokens_per_second: args.tokens_per_second,
        weight_version: args.weight_version,
        tokenizer,
        record: false,
        routed_experts_bytes: args.routed_experts_bytes,
        incremental: args.incremental_streaming,
        chat: args.chat,
        kv: (args.kv_capacity_tokens > 0).then(|| KvModel {
            capacity_tokens: args.kv_capacity_tokens,
            prefill_per_token: Duration::from_secs_f64(args.prefill_us_per_token / 1e6),
            decode_step: Duration::from_secs_f64(args.decode_ms_per_step / 1e3),
            decode_per_request: Duration::from_secs_f64(args.decode_ms_per_request / 1e3),
            max_running: args.max_running.max(1),
            max_prefill_tokens: args.max_prefill_tokens.max(1),
        }),
        role: match args.role.as_str() {
            "prefill" => Role::Prefill,
            "decode" => Role::Decode,
            _ => Role::Regular,
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let addr = tokio::net::lookup_host((args.host.as_str(), args.port))
            .await?
            .next()
            .ok_or_else(|| anyhow::anyhow!("cannot resolve {}", args.host))?;
        let worker = MockWorker::start_on(addr, config).await?;
        println!("{}", worker.url());
        tokio::signal::ctrl_c().await?;
        drop(worker);
        Ok(())
    })
}
