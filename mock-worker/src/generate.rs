//! `/generate`: a deterministic continuation in SGLang's response shape, whole or as
//! server-sent events.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::body::{MockBody, event_stream, json};
use crate::state::{Abort, InFlightCount, MockConfig, Role, State, lock};

/// The continuation every mock generation draws from.
const PHRASE: &str = " the quick brown fox jumps over the lazy dog and keeps running far away";

/// What one generation produces, before it is shaped into JSON.
struct Generation {
    prompt: Vec<u32>,
    cached_tokens: usize,
    ids: Vec<u32>,
    texts: Vec<String>,
    logprob: bool,
    weight_version: String,
    routed_experts: Option<String>,
    /// The bootstrap fields a decode leg got, echoed in `meta_info`.
    bootstrap: Option<Value>,
    /// The last output id is this EOS: the generation stops there, not at its length.
    eos: Option<u32>,
}

/// How a generation ended, for `finish_reason`.
#[derive(Clone, Copy, PartialEq)]
enum End {
    Running,
    Length,
    Abort,
}

impl Generation {
    /// SGLang's response for output tokens `from..to` (everything before `to` unless the
    /// stream is incremental).
    fn to_json(&self, from: usize, to: usize, end: End) -> Value {
        let ids = &self.ids[from..to];
        let finish = match end {
            End::Running => Value::Null,
            End::Length if to == self.ids.len() && self.eos.is_some() => {
                json!({"type": "stop", "matched": self.eos})
            }
            End::Length => json!({"type": "length", "length": to}),
            End::Abort => json!({"type": "abort", "message": "Aborted"}),
        };
        let mut meta = json!({
            "id": "mock",
            "prompt_tokens": self.prompt.len(),
            "completion_tokens": to,
            "cached_tokens": self.cached_tokens,
            "weight_version": self.weight_version,
            "finish_reason": finish,
        });
        if self.logprob {
            let logprobs: Vec<Value> = ids
                .iter()
                .enumerate()
                .map(|(i, id)| json!([logprob_under(from + i, &self.weight_version), id, null]))
                .collect();
            meta["output_token_logprobs"] = Value::Array(logprobs);
        }
        if let Some(experts) = &self.routed_experts {
            meta["routed_experts"] = Value::String(experts.clone());
        }
        if let Some(Value::Object(fields)) = &self.bootstrap {
            for (key, value) in fields {
                meta[key] = value.clone();
            }
        }
        json!({"text": self.texts[from..to].concat(), "output_ids": ids, "meta_info": meta})
    }
}

/// Registers a running generation for `/abort_request` until dropped.
struct Running {
    abort: Arc<Abort>,
    state: Arc<State>,
}

impl Running {
    fn enter(state: &Arc<State>, rid: Option<String>) -> Self {
        let abort = Arc::new(Abort {
            rid,
            flag: AtomicBool::new(false),
            notify: tokio::sync::Notify::new(),
        });
        lock(&state.running).push(abort.clone());
        Self {
            abort,
            state: state.clone(),
        }
    }

    /// Waits `pace` (or not at all), or until aborted; true if aborted.
    async fn wait(&self, pace: Option<Duration>) -> bool {
        if let Some(pace) = pace {
            let aborted = self.abort.notify.notified();
            tokio::select! {
                _ = tokio::time::sleep(pace) => {}
                _ = aborted => {}
            }
        }
        self.abort.is_set()
    }

    /// Waits while the worker is paused (or until aborted).
    async fn unpaused(&self) {
        let mut paused = self.state.paused.subscribe();
        let aborted = self.abort.notify.notified();
        tokio::select! {
            _ = paused.wait_for(|p| !p) => {}
            _ = aborted => {}
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        lock(&self.state.running).retain(|a| !Arc::ptr_eq(a, &self.abort));
        if self.abort.is_set() {
            self.state.aborted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A deterministic, clearly non-zero logprob for output position `i`.
pub fn mock_logprob(i: usize) -> f64 {
    -0.125 * (1 + i % 7) as f64
}

/// [`mock_logprob`] as weights of `version` give it: the same under a version that is not an
/// integer (`default`), shifted by a version that is, so that one text generated under two
/// versions differs in its logprobs, as it does on a real engine. Exact in f32.
fn logprob_under(i: usize, version: &str) -> f64 {
    let shift = version.parse::<u64>().map_or(0, |v| v % 8);
    mock_logprob(i) - shift as f64 / 64.0
}

pub(crate) async fn generate(
    config: &MockConfig,
    state: &Arc<State>,
    body: &[u8],
    count: InFlightCount,
) -> Response<MockBody> {
    let request: Value = match serde_json::from_slice(body) {
        Ok(value @ Value::Object(_)) => value,
        _ => {
            return json(
                StatusCode::BAD_REQUEST,
                &json!({"error": "body must be a JSON object"}),
            );
        }
    };
    if config.failure_rate > 0.0 && fastrand::f64() < config.failure_rate {
        return json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"error": "mock failure"}),
        );
    }
    let bootstrap = match bootstrap(config.role, &request) {
        Ok(bootstrap) => bootstrap,
        Err(error) => return json(StatusCode::BAD_REQUEST, &json!({"error": error})),
    };
    let mut generation = match plan(config, state, &request) {
        Ok(generation) => generation,
        Err(error) => return json(StatusCode::BAD_REQUEST, &json!({"error": error})),
    };
    if config.role == Role::Prefill {
        // A prefill server computes the prompt only; the decode leg generates.
        generation.ids.clear();
        generation.texts.clear();
    }
    generation.bootstrap = bootstrap;
    let _generating = Generating::enter(state, &generation);
    let running = Running::enter(state, rid_of(&request));
    running.unpaused().await;
    let pace = (config.tokens_per_second > 0.0)
        .then(|| Duration::from_secs_f64(1.0 / config.tokens_per_second));
    let streamed = request.get("stream").and_then(Value::as_bool) == Some(true);
    if let Some(scheduler) = state.scheduler.get() {
        // Simulated time: the answer comes when the scheduler has run its prefill and steps.
        let cached = scheduler
            .generate(generation.prompt.clone(), generation.ids.clone())
            .await
            .unwrap_or(0);
        state
            .cached_tokens
            .fetch_add(cached as u64, Ordering::Relaxed);
        generation.cached_tokens = cached;
    }
    let pace = pace.filter(|_| state.scheduler.get().is_none());
    if streamed && config.role != Role::Prefill {
        return stream(
            generation,
            pace,
            config.incremental,
            (count, _generating, running),
        );
    }
    let total = generation.ids.len();
    let mut made = 0;
    let mut end = End::Length;
    while made < total {
        if running.wait(pace).await {
            end = End::Abort;
            break;
        }
        made += 1;
    }
    if running.abort.is_set() {
        end = End::Abort;
    }
    json(StatusCode::OK, &generation.to_json(0, made, end))
}

/// The request's `rid` (a batch's first).
fn rid_of(request: &Value) -> Option<String> {
    match request.get("rid")? {
        Value::String(rid) => Some(rid.clone()),
        Value::Array(rids) => rids.first()?.as_str().map(str::to_owned),
        _ => None,
    }
}

fn plan(config: &MockConfig, state: &State, request: &Value) -> Result<Generation, String> {
    let prompt = match (request.get("text"), request.get("input_ids")) {
        (Some(Value::String(text)), _) => encode(config, text)?,
        (_, Some(Value::Array(ids))) => ids
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or("input_ids must be u32")
            })
            .collect::<Result<Vec<u32>, _>>()?,
        _ => return Err("request needs text or input_ids".to_owned()),
    };
    let max_new = request
        .pointer("/sampling_params/max_new_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(16) as usize;
    let mut eos = None;
    let ids = match lock(&state.scripted).take() {
        Some(ids) => ids,
        None if config.chat => {
            let (ids, stopped) = chat_reply(config, &prompt, max_new)?;
            eos = stopped;
            ids
        }
        None => {
            let start = prompt.iter().fold(prompt.len(), |h, &id| {
                h.wrapping_mul(31).wrapping_add(id as usize)
            }) % PHRASE.len();
            // Enough of the phrase for `max_new` tokens (a token is at least a byte).
            let repeats = max_new.div_ceil(PHRASE.len()) + 1;
            let phrase = format!("{}{}", &PHRASE[start..], PHRASE.repeat(repeats));
            let mut ids = encode(config, &phrase)?;
            ids.truncate(max_new);
            ids
        }
    };
    let texts = ids
        .iter()
        .map(|&id| decode(config, &[id]))
        .collect::<Result<Vec<_>, _>>()?;
    let texts = fix_split_chars(config, &ids, texts)?;
    let logprob = request.get("return_logprob").and_then(Value::as_bool) == Some(true);
    let weight_version = lock(&state.weight_version).clone();
    let routed_experts = (config.routed_experts_bytes > 0)
        .then(|| "QUJD".repeat(config.routed_experts_bytes.div_ceil(4)));
    Ok(Generation {
        prompt,
        cached_tokens: 0,
        ids,
        texts,
        logprob,
        weight_version,
        routed_experts,
        bootstrap: None,
        eos,
    })
}

/// A `--chat` reply's ids, cut at `max_new`, and its EOS when it fit.
fn chat_reply(
    config: &MockConfig,
    prompt: &[u32],
    max_new: usize,
) -> Result<(Vec<u32>, Option<u32>), String> {
    let Some(tokenizer) = &config.tokenizer else {
        return Err("--chat needs --tokenizer".to_owned());
    };
    let text = tokenizer.decode(prompt, false)?;
    let mut ids = tokenizer.encode(&crate::chat::reply(&text))?;
    let eos = tokenizer.encode("<|im_end|>")?;
    ids.extend_from_slice(&eos);
    let fits = ids.len() <= max_new;
    ids.truncate(max_new);
    Ok((ids, eos.last().copied().filter(|_| fits)))
}

/// The bootstrap fields a prefill or decode mock needs (decode echoes them); `None` for a
/// regular one. SGLang's servers fail a disaggregated request without them.
fn bootstrap(role: Role, request: &Value) -> Result<Option<Value>, String> {
    if role == Role::Regular {
        return Ok(None);
    }
    let field = |name: &str| request.get(name).cloned();
    let (host, room) = (field("bootstrap_host"), field("bootstrap_room"));
    let valid_host = host.as_ref().is_some_and(Value::is_string);
    let valid_room = room.as_ref().is_some_and(|r| r.is_u64() || r.is_array());
    if !valid_host || !valid_room {
        return Err(format!(
            "a {role:?} worker needs bootstrap_host and bootstrap_room (got {host:?}, {room:?})"
        ));
    }
    Ok(Some(json!({
        "bootstrap_host": host,
        "bootstrap_port": field("bootstrap_port").unwrap_or(Value::Null),
        "bootstrap_room": room,
    })))
}

/// Counts a generation on /metrics while it runs, and its tokens once.
struct Generating(Arc<State>);

impl Generating {
    fn enter(state: &Arc<State>, generation: &Generation) -> Self {
        state.generating.fetch_add(1, Ordering::Relaxed);
        state.generations.fetch_add(1, Ordering::Relaxed);
        state
            .prompt_tokens
            .fetch_add(generation.prompt.len() as u64, Ordering::Relaxed);
        state
            .generated_tokens
            .fetch_add(generation.ids.len() as u64, Ordering::Relaxed);
        Self(state.clone())
    }
}

impl Drop for Generating {
    fn drop(&mut self) {
        self.0.generating.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Per-token texts must concatenate to the decoded whole. Tokens that split a character
/// decode badly alone, and a decoder that joins tokens (WordPiece puts spaces between words)
/// gives more than their sum, so then each token gets what it adds to the decoded prefix, as
/// SGLang's incremental detokenizer streams it: a prefix that does not start the whole (a
/// split character) holds its text back until a later token completes it.
fn fix_split_chars(
    config: &MockConfig,
    ids: &[u32],
    texts: Vec<String>,
) -> Result<Vec<String>, String> {
    let whole = decode(config, ids)?;
    if texts.concat() == whole {
        return Ok(texts);
    }
    let mut fixed = Vec::with_capacity(ids.len());
    let mut sent = 0;
    for end in 1..=ids.len() {
        let prefix = decode(config, &ids[..end])?;
        let settled = prefix.len() >= sent && whole.starts_with(&prefix);
        let upto = if end == ids.len() {
            whole.len()
        } else if settled {
            prefix.len()
        } else {
            sent
        };
        fixed.push(whole[sent..upto].to_owned());
        sent = upto;
    }
    Ok(fixed)
}

fn encode(config: &MockConfig, text: &str) -> Result<Vec<u32>, String> {
    match &config.tokenizer {
        Some(tokenizer) => tokenizer.encode(text),
        None => Ok(text.bytes().map(u32::from).collect()),
    }
}

fn decode(config: &MockConfig, ids: &[u32]) -> Result<String, String> {
    match &config.tokenizer {
        Some(tokenizer) => tokenizer.decode(ids, true),
        None => {
            let bytes: Vec<u8> = ids
                .iter()
                .map(|&id| u8::try_from(id).unwrap_or(b'?'))
                .collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }
}

/// What a stream's task holds until its last event: the request counts and abort switch.
type Held = (InFlightCount, Generating, Running);

fn stream(
    generation: Generation,
    pace: Option<Duration>,
    incremental: bool,
    held: Held,
) -> Response<MockBody> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let (_count, _generating, running) = held;
        let total = generation.ids.len();
        let mut sent = 0;
        for n in 1..=total {
            let aborted = running.wait(pace).await;
            let (made, end) = match (aborted, n == total) {
                (true, _) => (n - 1, End::Abort),
                (false, true) => (n, End::Length),
                (false, false) => (n, End::Running),
            };
            let from = if incremental { sent } else { 0 };
            let event = format!("data: {}\n\n", generation.to_json(from, made, end));
            sent = made;
            if tx.send(Bytes::from(event)).await.is_err() {
                // The client closed the connection: SGLang aborts the request then.
                running.abort.flag.store(true, Ordering::Relaxed);
                break;
            }
            if aborted {
                break;
            }
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    event_stream(rx)
}
