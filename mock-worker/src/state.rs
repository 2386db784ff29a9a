//! What the mock is told (its config) and what it keeps (counts, recorded requests).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};

use crate::tokenizer::Tokenizer;

/// The part a mock plays in a prefill/decode deployment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    /// Serves whole generations.
    #[default]
    Regular,
    /// Answers after its prefill delay with no output, as an SGLang prefill server does.
    Prefill,
    /// Generates, and echoes the bootstrap fields it got in `meta_info`.
    Decode,
}

/// How the mock behaves; defaults answer at once.
#[derive(Clone, Default)]
pub struct MockConfig {
    /// Regular, prefill or decode; prefill and decode refuse generations without the
    /// bootstrap fields (400).
    pub role: Role,
    /// Stream SGLang's incremental output (`--incremental-streaming-output`): each event
    /// carries only the new text, `output_ids` and logprobs, not everything so far.
    pub incremental: bool,
    /// Simulate a prefix KV cache and a batching scheduler (see [`crate::KvModel`]): prompts
    /// cost prefill time for their uncached tokens, outputs one decode step per token.
    pub kv: Option<crate::kv::KvModel>,
    /// Delay before every answer.
    pub delay: Duration,
    /// Fraction of /generate requests answered with 500.
    pub failure_rate: f64,
    /// Pace of streamed tokens (0 = as fast as possible); also paces non-streamed answers.
    pub tokens_per_second: f64,
    /// `meta_info.weight_version` to report.
    pub weight_version: String,
    /// Encode/decode with a real tokenizer; without one a token is a byte.
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// Keep every request for [`MockWorker::seen`] (tests); off for long benchmark runs.
    pub record: bool,
    /// Bytes of base64-like `meta_info.routed_experts` per answer (MoE routing replay makes
    /// SGLang answers megabytes long); 0 leaves the field out.
    pub routed_experts_bytes: usize,
    /// Reply to the conversation in a ChatML prompt and end with its EOS (`<|im_end|>`),
    /// finishing with `stop`, instead of continuing the prompt (needs the tokenizer).
    pub chat: bool,
}

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The request method.
    pub method: Method,
    /// Path and query as received.
    pub path_and_query: String,
    /// Headers as received.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

#[derive(Default)]
pub(crate) struct State {
    pub healthy: AtomicBool,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    pub requests: AtomicUsize,
    /// Health and model-info probes, which `requests` leaves out.
    pub probes: AtomicUsize,
    pub seen: Mutex<Vec<Seen>>,
    pub scripted: Mutex<Option<Vec<u32>>>,
    /// `/generate` requests being answered now.
    pub generating: AtomicUsize,
    pub generations: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Prompt tokens found in the KV cost model's prefix cache, and those it computed.
    pub cached_tokens: AtomicU64,
    pub prefill_computed: Arc<AtomicU64>,
    /// The KV cost model's scheduler, with `MockConfig::kv`.
    pub scheduler: std::sync::OnceLock<crate::kv::Scheduler>,
    /// The weight version it reports (`MockConfig::weight_version`, then what updates set).
    pub weight_version: Mutex<String>,
    /// True between `/pause_generation` and `/continue_generation`: new generations wait.
    pub paused: tokio::sync::watch::Sender<bool>,
    /// Generations running now, for `/abort_request`.
    pub running: Mutex<Vec<Arc<Abort>>>,
    /// Generations that ended aborted.
    pub aborted: AtomicUsize,
    /// Client connections open now.
    pub connections: AtomicUsize,
}

/// One running generation's abort switch.
pub(crate) struct Abort {
    pub rid: Option<String>,
    pub flag: AtomicBool,
    pub notify: tokio::sync::Notify,
}

impl Abort {
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Counts a request in flight until dropped (a stream's task holds it to its last event).
pub(crate) struct InFlightCount(Arc<State>);

impl InFlightCount {
    pub fn enter(state: &Arc<State>) -> Self {
        let now = state.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        state.max_in_flight.fetch_max(now, Ordering::Relaxed);
        state.requests.fetch_add(1, Ordering::Relaxed);
        Self(state.clone())
    }
}

impl Drop for InFlightCount {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
