//! Command-line configuration: SlimeRouter's flags, names and defaults unchanged, plus the
//! knobs an operator of a long RL job expects.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::policy::version::VersionPolicy;

/// Every setting of the router, parsed once at startup.
#[derive(Parser, Debug, Clone)]
#[command(name = "slime-router", version, about)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub sglang_router_ip: String,

    /// Port to listen on (0 picks a free port).
    #[arg(long, default_value_t = 30000)]
    pub sglang_router_port: u16,

    /// Middleware components, run in the order given: a `.wasm` file, or the name of one
    /// built into the router (see --list-middleware). A config string may follow after `?`,
    /// e.g. `radix_tree?max_tokens=1000000`.
    #[arg(long, num_args = 1.., value_name = "PATH")]
    pub slime_router_middleware_paths: Vec<String>,

    /// Print the names of the built-in middleware and exit.
    #[arg(long)]
    pub list_middleware: bool,

    /// Upstream timeout in seconds, for the response head and between body chunks
    /// (none by default: long generations are normal).
    #[arg(long, value_name = "SECONDS", value_parser = positive_secs)]
    pub slime_router_timeout: Option<f64>,

    /// Maximum concurrent upstream connections (requests beyond it wait for a free one).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub slime_router_max_connections: u32,

    /// Seconds to connect to a worker, apart from --slime-router-timeout: a host that
    /// drops connection attempts counts as failed this soon, and the request moves on.
    #[arg(long, default_value_t = 3.0, value_parser = positive_secs)]
    pub connect_timeout_secs: f64,

    /// Consecutive failed probes (or connect failures) before a worker is DEAD.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub slime_router_health_check_failure_threshold: u32,

    /// Seconds between health-probe rounds.
    #[arg(long, default_value_t = 30.0, value_parser = positive_secs)]
    pub rollout_health_check_interval: f64,

    /// Verbose logging (same as `--log-level debug`).
    #[arg(long)]
    pub verbose: bool,

    /// Log filter, e.g. `info` or `slime_router=debug` (default: RUST_LOG, else info).
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Workers to register at startup.
    #[arg(long, num_args = 1.., value_name = "URL")]
    pub worker_urls: Vec<String>,

    /// Seconds a health probe may take before it counts as failed.
    #[arg(long, default_value_t = 5.0, value_parser = positive_secs)]
    pub health_check_timeout: f64,

    /// Path probed on each worker.
    #[arg(long, default_value = "/health")]
    pub health_check_path: String,

    /// Consecutive successful probes before a DEAD worker serves again.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_check_success_threshold: u32,

    /// Largest request body accepted, in MiB (routed_experts payloads are large).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_request_body_mib: u64,

    /// Worker hosts that may be registered: names, addresses or CIDRs (`10.0.0.0/8`). When
    /// given, no other host is accepted. Without it any host is, except link-local and cloud
    /// metadata addresses (169.254.0.0/16, fe80::/10, fd00:ec2::254), which must be named here.
    #[arg(long, num_args = 1.., value_name = "HOST|CIDR")]
    pub allow_worker_host: Vec<String>,

    /// Client connections open at once, across threads; beyond it a new connection gets 503
    /// JSON and is closed, so a flood cannot exhaust the router's file descriptors.
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_client_connections: u32,

    /// Seconds a client may take to send its whole request body (then 408).
    #[arg(long, default_value_t = 60.0, value_parser = positive_secs)]
    pub client_body_timeout_secs: f64,

    /// When set, worker-management endpoints require `Authorization: Bearer <key>`.
    #[arg(long, env = "SLIME_ROUTER_ADMIN_API_KEY", hide_env_values = true)]
    pub admin_api_key: Option<String>,

    /// Model directory holding tokenizer.json, or the tokenizer.json itself; backs the
    /// middleware `tokenizer` import.
    #[arg(long, value_name = "PATH")]
    pub hf_checkpoint: Option<PathBuf>,

    /// Guest CPU time allowed per middleware call, in milliseconds (host calls excluded),
    /// plus 10 us per KiB of data the call hands the guest.
    #[arg(long, default_value_t = 5.0, value_parser = positive_secs)]
    pub middleware_deadline_ms: f64,

    /// Memory cap per middleware instance, in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub middleware_memory_mib: u64,

    /// Serving threads, each with its own event loop and listener (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,

    /// Routing policy: `least_in_flight` (fewest requests in flight, random ties) or
    /// `cache_aware` (the worker most likely holding the prompt's prefix in its KV cache,
    /// within the load bound). Session keys are honoured under either.
    #[arg(long, default_value = "least_in_flight", value_parser = ["least_in_flight", "cache_aware"])]
    pub policy: String,

    /// More headers that carry a session key, besides X-SMG-Routing-Key and X-Session-ID.
    #[arg(long, num_args = 1.., value_name = "HEADER")]
    pub routing_key_headers: Vec<String>,

    /// Load bound of session and prefix affinity: a worker is overloaded when its requests in
    /// flight exceed the least loaded worker's by more than this and by more than
    /// --balance-rel-threshold times it.
    #[arg(long, default_value_t = 16)]
    pub balance_abs_threshold: usize,

    /// See --balance-abs-threshold.
    #[arg(long, default_value_t = 1.5, value_parser = at_least_one)]
    pub balance_rel_threshold: f64,

    /// Seconds a session key's pin lasts unused.
    #[arg(long, default_value_t = 3600.0, value_parser = positive_secs)]
    pub session_idle_secs: f64,

    /// Session keys pinned at most; beyond it the least recently used is dropped.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_sessions: u64,

    /// Prompt tokens the cache_aware index remembers per worker (LRU), to mirror the worker's
    /// own prefix cache; about its KV cache capacity.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(16..))]
    pub cache_capacity_tokens: u64,

    /// Which workers new requests may go to by the weight version they run: `any`, `latest`
    /// (only the newest version a worker reports) or `max-staleness:K` (at most K versions
    /// behind it). Versions order numerically when both are integers, else by arrival. A
    /// request waits, up to --slime-router-timeout (else 600 s), while no worker qualifies.
    #[arg(long, default_value = "any", value_parser = VersionPolicy::parse)]
    pub version_policy: VersionPolicy,

    /// Seconds each worker may take to answer a fanned-out control call (weight updates,
    /// pause, flush, abort).
    #[arg(long, default_value_t = 600.0, value_parser = positive_secs)]
    pub control_timeout_secs: f64,

    /// Seconds to let in-flight requests finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 30.0, value_parser = positive_secs)]
    pub shutdown_timeout: f64,
}

fn at_least_one(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 1.0 => Ok(v),
        _ => Err(format!("expected a number of at least 1, got {s:?}")),
    }
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("expected a positive number, got {s:?}")),
    }
}

impl Config {
    /// A config with every default and no workers, for embedding and tests.
    pub fn for_tests() -> Self {
        let mut config = Self::parse_from(["slime-router"]);
        config.sglang_router_port = 0;
        config
    }

    /// `--slime-router-timeout` as a duration.
    pub fn upstream_timeout(&self) -> Option<Duration> {
        self.slime_router_timeout.map(Duration::from_secs_f64)
    }

    /// `--control-timeout-secs` as a duration.
    pub fn control_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.control_timeout_secs)
    }

    /// `--rollout-health-check-interval` as a duration.
    pub fn health_interval(&self) -> Duration {
        Duration::from_secs_f64(self.rollout_health_check_interval)
    }

    /// `--max-request-body-mib` in bytes.
    pub fn max_request_body_bytes(&self) -> usize {
        usize::try_from(self.max_request_body_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
    }
}
